#include "host_buffer.h"

#include "host_memory.h"

namespace sllm {

HostBuffer::HostBuffer(size_t nbytes, bool prefault, int threads) : data_(map_host(nbytes)), nbytes_(nbytes) {
  if (prefault) prefault_host(data_, nbytes_, threads);
}

HostBuffer::~HostBuffer() { unmap_host(data_, nbytes_); }

}  // namespace sllm
