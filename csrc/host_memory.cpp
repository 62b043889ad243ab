#include "host_memory.h"

#include <sys/mman.h>

#include <new>
#include <system_error>
#include <algorithm>
#include <thread>
#include <vector>

namespace sllm {

#ifdef MADV_POPULATE_WRITE
constexpr int kPopulateWrite = MADV_POPULATE_WRITE;
#else
constexpr int kPopulateWrite = 23;  // Linux >= 5.14
#endif

void* map_host(size_t nbytes, bool huge) {
  size_t len = round_up(nbytes ? nbytes : 1, kHugePage);
  // Over-map by one huge page so the usable range can start 2 MiB aligned.
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  auto base = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = round_up(base, kHugePage);
  if (aligned > base) munmap(raw, aligned - base);
  size_t tail = (base + len + kHugePage) - (aligned + len);
  if (tail) munmap(reinterpret_cast<void*>(aligned + len), tail);
  if (huge) madvise(reinterpret_cast<void*>(aligned), len, MADV_HUGEPAGE);
  return reinterpret_cast<void*>(aligned);
}

void unmap_host(void* p, size_t nbytes) {
  if (p) munmap(p, round_up(nbytes ? nbytes : 1, kHugePage));
}

void prefault_host(void* p, size_t nbytes, int threads) {
  if (!p || !nbytes) return;
  if (threads < 1) threads = 1;
  auto* base = static_cast<volatile char*>(p);
  size_t per = round_up((nbytes + threads - 1) / threads, 4096);
  auto touch = [base](size_t lo, size_t hi) {
    // MADV_POPULATE_WRITE faults pages in without touching their contents, so
    // it is safe on memory that another thread is already filling.
    if (madvise(const_cast<char*>(base) + lo, hi - lo, kPopulateWrite) == 0) return;
    for (size_t off = lo; off < hi; off += 4096) __atomic_fetch_or(const_cast<char*>(base) + off, 0, __ATOMIC_RELAXED);
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; t++) {
    size_t lo = t * per, hi = std::min(nbytes, lo + per);
    if (lo >= hi) break;
    try {
      pool.emplace_back(touch, lo, hi);
    } catch (const std::system_error&) {  // no thread to spare: this one does the rest
      touch(lo, nbytes);
      break;
    }
  }
  for (auto& th : pool) th.join();
}

}  // namespace sllm
