#include "crc32c.h"

#include <array>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace sllm {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = (c >> 1) ^ ((c & 1) ? kPoly : 0);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
      for (int s = 1; s < 8; s++) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};

const Tables& tables() {
  static const Tables tabs;
  return tabs;
}

// Slicing-by-8 software fallback.
uint32_t crc_sw(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& t = tables().t;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xff];
    n--;
  }
  while (n >= 8) {
    uint64_t w;
    __builtin_memcpy(&w, p, 8);
    w ^= crc;
    crc = t[7][w & 0xff] ^ t[6][(w >> 8) & 0xff] ^ t[5][(w >> 16) & 0xff] ^ t[4][(w >> 24) & 0xff] ^
          t[3][(w >> 32) & 0xff] ^ t[2][(w >> 40) & 0xff] ^ t[1][(w >> 48) & 0xff] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xff];
  return crc;
}

#if defined(__x86_64__)
// Shifting a CRC over `len` zero bytes is linear in GF(2): precompute that
// operator as four byte tables so three independent lanes can be merged.
constexpr size_t kLane = 8192;

struct LaneShift {
  uint32_t t[4][256];
  LaneShift() {
    // Build the 32x32 operator for one zero bit, then square it up to kLane*8 bits.
    uint32_t op[32], sq[32];
    op[0] = kPoly;
    for (int i = 1; i < 32; i++) op[i] = 1u << (i - 1);
    auto apply = [](const uint32_t* m, uint32_t v) {
      uint32_t r = 0;
      for (int i = 0; v; i++, v >>= 1)
        if (v & 1) r ^= m[i];
      return r;
    };
    auto square = [&](uint32_t* dst, const uint32_t* src) {
      for (int i = 0; i < 32; i++) dst[i] = apply(src, src[i]);
    };
    // result = operator for 2^k bits; kLane*8 = 65536 bits = 2^16.
    uint32_t cur[32];
    for (int i = 0; i < 32; i++) cur[i] = op[i];
    size_t bits = 1;
    while (bits < kLane * 8) {
      square(sq, cur);
      for (int i = 0; i < 32; i++) cur[i] = sq[i];
      bits <<= 1;
    }
    for (int b = 0; b < 4; b++)
      for (uint32_t v = 0; v < 256; v++) t[b][v] = apply(cur, v << (8 * b));
  }
  uint32_t shift(uint32_t crc) const {
    return t[0][crc & 0xff] ^ t[1][(crc >> 8) & 0xff] ^ t[2][(crc >> 16) & 0xff] ^ t[3][crc >> 24];
  }
};

const LaneShift& lane_shift() {
  static const LaneShift s;
  return s;
}

__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c0 = crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), *p++);
    n--;
  }
  // Three interleaved lanes hide the instruction's 3-cycle latency.
  const LaneShift& ls = lane_shift();
  while (n >= 3 * kLane) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t* p1 = p + kLane;
    const uint8_t* p2 = p + 2 * kLane;
    for (size_t i = 0; i < kLane; i += 8) {
      uint64_t w0, w1, w2;
      __builtin_memcpy(&w0, p + i, 8);
      __builtin_memcpy(&w1, p1 + i, 8);
      __builtin_memcpy(&w2, p2 + i, 8);
      c0 = _mm_crc32_u64(c0, w0);
      c1 = _mm_crc32_u64(c1, w1);
      c2 = _mm_crc32_u64(c2, w2);
    }
    uint32_t merged = ls.shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    merged = ls.shift(merged) ^ static_cast<uint32_t>(c2);
    c0 = merged;
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  while (n >= 8) {
    uint64_t w;
    __builtin_memcpy(&w, p, 8);
    c0 = _mm_crc32_u64(c0, w);
    p += 8;
    n -= 8;
  }
  while (n--) c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), *p++);
  return static_cast<uint32_t>(c0);
}
#endif

bool detect_hw() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("sse4.2");
#else
  return false;
#endif
}

}  // namespace

bool crc32c_hardware() {
  static const bool hw = detect_hw();
  return hw;
}

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  if (crc32c_hardware()) return ~crc_hw(crc, p, n);
#endif
  return ~crc_sw(crc, p, n);
}

}  // namespace sllm
