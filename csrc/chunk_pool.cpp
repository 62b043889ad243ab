#include "chunk_pool.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "host_memory.h"

namespace sllm {

ChunkPool::ChunkPool(size_t chunk_size, size_t capacity_bytes) : chunk_size_(chunk_size) {
  if (chunk_size == 0 || chunk_size % 4096)
    throw std::invalid_argument("chunk size must be a positive multiple of 4096 bytes");
  capacity_ = capacity_bytes / chunk_size;
  base_ = static_cast<char*>(map_host(std::max<size_t>(capacity_, 1) * chunk_size_));
  in_use_.assign(capacity_, 0);
  free_.reserve(capacity_);
  // Hand out low ids first: they are the ones pre-faulted first.
  for (size_t i = capacity_; i-- > 0;) free_.push_back(static_cast<int64_t>(i));
}

ChunkPool::~ChunkPool() {
  stop_prefault();
  unmap_host(base_, std::max<size_t>(capacity_, 1) * chunk_size_);
}

std::vector<int64_t> ChunkPool::allocate(size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  if (n > free_.size()) return {};
  std::vector<int64_t> out(free_.end() - n, free_.end());
  free_.resize(free_.size() - n);
  std::reverse(out.begin(), out.end());
  for (auto id : out) in_use_[id] = 1;
  allocations_ += n;
  high_water_ = std::max(high_water_, capacity_ - free_.size());
  return out;
}

void ChunkPool::release(const std::vector<int64_t>& ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto id : ids)
    if (id < 0 || static_cast<size_t>(id) >= capacity_ || !in_use_[id])
      throw std::invalid_argument("chunk " + std::to_string(id) + " is not allocated");
  for (auto id : ids) {
    in_use_[id] = 0;
    free_.push_back(id);
  }
  releases_ += ids.size();
}

char* ChunkPool::address(int64_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= capacity_) throw std::out_of_range("no such chunk");
  return base_ + static_cast<size_t>(id) * chunk_size_;
}

PoolStats ChunkPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {chunk_size_, capacity_, free_.size(), high_water_, allocations_, releases_, prefaulted_.load()};
}

void ChunkPool::start_prefault(int threads) {
  if (prefault_thread_.joinable()) return;
  prefault_thread_ = std::thread([this, threads] {
    // Step through in 64 MiB slices so progress is visible in stats().
    const size_t total = capacity_ * chunk_size_, step = 64u << 20;
    try {
      for (size_t off = 0; off < total && !stop_prefault_; off += step) {
        size_t len = std::min(step, total - off);
        prefault_host(base_ + off, len, threads);
        prefaulted_ += len;
      }
    } catch (...) {  // an optimisation only: unfaulted pages fault in on first use
    }
  });
}

void ChunkPool::stop_prefault() {
  stop_prefault_ = true;
  wait_prefault();
}

void ChunkPool::wait_prefault() {
  if (prefault_thread_.joinable()) prefault_thread_.join();
}

}  // namespace sllm
