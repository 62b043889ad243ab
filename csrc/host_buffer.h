// One host allocation that backs a partition's tensors on a CPU "device".
// Exposed to Python through the buffer protocol; unmapped when the last view dies.
#pragma once
#include <cstddef>

namespace sllm {

class HostBuffer {
 public:
  HostBuffer(size_t nbytes, bool prefault, int threads);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }

 private:
  void* data_;
  size_t nbytes_;
};

}  // namespace sllm
