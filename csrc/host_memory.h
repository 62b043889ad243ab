// Anonymous host memory for large buffers: 2 MiB aligned, transparent huge
// pages requested, optionally pre-faulted (first touch of fresh memory runs at
// 1-2 GB/s with 4 KiB pages, several times faster with huge pages).
#pragma once
#include <cstddef>
#include <cstdint>

namespace sllm {

constexpr size_t kHugePage = 2u << 20;

inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Maps `nbytes` (rounded up to 2 MiB); throws std::bad_alloc when the kernel refuses.
void* map_host(size_t nbytes);
void unmap_host(void* p, size_t nbytes);
// Touches every page of [p, p+nbytes) with `threads` threads, so later copies never fault.
void prefault_host(void* p, size_t nbytes, int threads);

}  // namespace sllm
