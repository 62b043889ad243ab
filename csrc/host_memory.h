// Anonymous host memory for large buffers: 2 MiB aligned, transparent huge
// pages requested where asked, optionally pre-faulted.
#pragma once
#include <cstddef>
#include <cstdint>

namespace sllm {

constexpr size_t kHugePage = 2u << 20;

inline size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Maps `nbytes` (rounded up to 2 MiB); throws std::bad_alloc when the kernel refuses.
// `huge` requests transparent huge pages: right for memory pre-faulted once and
// kept (the pool, the arena), wrong for one-shot buffers: in a VM that returns
// freed memory to its host, first touch of fresh huge pages ran ~4x slower than
// of 4 KiB pages.
void* map_host(size_t nbytes, bool huge = true);
void unmap_host(void* p, size_t nbytes);
// Touches every page of [p, p+nbytes) with `threads` threads, so later copies never fault.
void prefault_host(void* p, size_t nbytes, int threads);

}  // namespace sllm
