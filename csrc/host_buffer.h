// Host memory that backs a partition's tensors on a CPU "device". Exposed to
// Python through the buffer protocol; given back when the last view dies:
// unmapped if it was mapped on its own, returned to its arena otherwise.
#pragma once
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace sllm {

// A pre-faulted region carved into 2 MiB-granular buffers (first fit,
// coalescing free list). Taking device buffers from here, instead of fresh
// memory, turns a 1-2 GB/s page-faulting copy into a plain memcpy.
class HostArena : public std::enable_shared_from_this<HostArena> {
 public:
  explicit HostArena(size_t capacity_bytes);
  ~HostArena();
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // Returns nullptr when no free range is large enough.
  char* take(size_t nbytes);
  void give(char* p, size_t nbytes);
  void start_prefault(int threads);
  size_t capacity() const { return capacity_; }
  size_t used() const;
  size_t largest_free() const;

 private:
  char* base_;
  size_t capacity_;
  mutable std::mutex mu_;
  std::map<size_t, size_t> free_;  // offset -> length
  size_t used_ = 0;
  std::unique_ptr<class PrefaultThread> prefault_;
};

class HostBuffer {
 public:
  // Its own mapping (4 KiB pages: see map_host), optionally pre-faulted.
  HostBuffer(size_t nbytes, bool prefault, int threads);
  // From an arena; throws std::bad_alloc when the arena has no room.
  HostBuffer(std::shared_ptr<HostArena> arena, size_t nbytes);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }

 private:
  char* data_;
  size_t nbytes_;
  std::shared_ptr<HostArena> arena_;
};

}  // namespace sllm
