// CRC-32C (Castagnoli), the checksum of the checkpoint format's blocks.
#pragma once
#include <cstddef>
#include <cstdint>

namespace sllm {

// Continues `crc` (0 to start) over `n` bytes. Uses SSE4.2 where the CPU has it.
uint32_t crc32c(uint32_t crc, const void* data, size_t n);

// True when the hardware instruction is in use (reported by the counters).
bool crc32c_hardware();

}  // namespace sllm
