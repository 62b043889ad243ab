// The DRAM chunk pool: fixed-size, 2 MiB aligned host chunks carved from one
// mapping. Fixed sizes avoid fragmentation; allocation and release are
// explicit and counted so a leak shows up in stats().
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace sllm {

struct PoolStats {
  size_t chunk_size, capacity_chunks, free_chunks, high_water;
  uint64_t allocations, releases;
  size_t prefaulted_bytes;
};

class ChunkPool {
 public:
  ChunkPool(size_t chunk_size, size_t capacity_bytes);
  ~ChunkPool();
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;

  // All-or-nothing: returns `n` chunk ids, or an empty vector when fewer are free.
  std::vector<int64_t> allocate(size_t n);
  // Throws std::invalid_argument on an id that is not currently allocated.
  void release(const std::vector<int64_t>& ids);

  char* address(int64_t id) const;
  size_t chunk_size() const { return chunk_size_; }
  size_t capacity_chunks() const { return capacity_; }
  uintptr_t base() const { return reinterpret_cast<uintptr_t>(base_); }
  size_t mapped_bytes() const { return chunk_size_ * capacity_; }
  PoolStats stats() const;
  // Touches the whole pool in a background thread (returns at once).
  void start_prefault(int threads);
  void wait_prefault();
  // Stops a prefault in progress after its current 64 MiB slice (shutdown).
  void stop_prefault();

 private:
  size_t chunk_size_, capacity_;
  char* base_;
  mutable std::mutex mu_;
  std::vector<int64_t> free_;
  std::vector<uint8_t> in_use_;
  size_t high_water_ = 0;
  uint64_t allocations_ = 0, releases_ = 0;
  std::atomic<size_t> prefaulted_{0};
  std::atomic<bool> stop_prefault_{false};
  std::thread prefault_thread_;
};

}  // namespace sllm
