#include "host_buffer.h"

#include <new>
#include <thread>

#include "host_memory.h"

namespace sllm {

class PrefaultThread {
 public:
  PrefaultThread(char* p, size_t n, int threads)
      : t_([=] {
          try {
            prefault_host(p, n, threads);
          } catch (...) {  // an optimisation only: unfaulted pages fault in on first use
          }
        }) {}
  ~PrefaultThread() { t_.join(); }

 private:
  std::thread t_;
};

HostArena::HostArena(size_t capacity_bytes)
    : base_(static_cast<char*>(map_host(capacity_bytes))), capacity_(round_up(capacity_bytes, kHugePage)) {
  if (capacity_) free_[0] = capacity_;
}

HostArena::~HostArena() {
  prefault_.reset();
  unmap_host(base_, capacity_);
}

char* HostArena::take(size_t nbytes) {
  const size_t len = round_up(nbytes ? nbytes : 1, kHugePage);
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < len) continue;
    const size_t off = it->first, rest = it->second - len;
    free_.erase(it);
    if (rest) free_[off + len] = rest;
    used_ += len;
    return base_ + off;
  }
  return nullptr;
}

void HostArena::give(char* p, size_t nbytes) {
  const size_t len = round_up(nbytes ? nbytes : 1, kHugePage);
  std::lock_guard<std::mutex> lock(mu_);
  size_t off = p - base_, size = len;
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + size) {  // merge with the range after
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {  // merge with the range before
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += size;
      used_ -= len;
      return;
    }
  }
  free_[off] = size;
  used_ -= len;
}

void HostArena::start_prefault(int threads) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!prefault_) prefault_ = std::make_unique<PrefaultThread>(base_, capacity_, threads);
}

size_t HostArena::used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

size_t HostArena::largest_free() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t best = 0;
  for (auto& [off, len] : free_) best = std::max(best, len);
  return best;
}

HostBuffer::HostBuffer(size_t nbytes, bool prefault, int threads)
    : data_(static_cast<char*>(map_host(nbytes, /*huge=*/false))), nbytes_(nbytes) {
  if (prefault) prefault_host(data_, nbytes_, threads);
}

HostBuffer::HostBuffer(std::shared_ptr<HostArena> arena, size_t nbytes)
    : data_(arena->take(nbytes)), nbytes_(nbytes), arena_(std::move(arena)) {
  if (!data_) throw std::bad_alloc();
}

HostBuffer::~HostBuffer() {
  if (arena_)
    arena_->give(data_, nbytes_);
  else
    unmap_host(data_, nbytes_);
}

}  // namespace sllm
