// Python bindings for the loader core (module sllmd._native). Every call that
// waits or moves bytes releases the GIL. The typed wrappers are in sllmd/pool/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "chunk_pool.h"
#include "crc32c.h"
#include "host_buffer.h"
#include "load_task.h"

namespace py = pybind11;
using namespace sllm;

namespace {

py::dict pool_stats(const ChunkPool& p) {
  PoolStats s = p.stats();
  py::dict d;
  d["chunk_size"] = s.chunk_size;
  d["capacity_chunks"] = s.capacity_chunks;
  d["free_chunks"] = s.free_chunks;
  d["used_chunks"] = s.capacity_chunks - s.free_chunks;
  d["high_water_chunks"] = s.high_water;
  d["allocations"] = s.allocations;
  d["releases"] = s.releases;
  d["prefaulted_bytes"] = s.prefaulted_bytes;
  return d;
}

py::dict load_stats(const LoadTask& t) {
  LoadStats s = t.stats();
  py::dict d;
  d["bytes_direct"] = s.bytes_direct;
  d["bytes_cached"] = s.bytes_cached;
  d["bytes_copied"] = s.bytes_copied;
  d["bytes_verified"] = s.bytes_verified;
  d["ns_read"] = s.ns_read;
  d["ns_verify"] = s.ns_verify;
  d["ns_copy"] = s.ns_copy;
  d["ns_wall"] = s.ns_wall;
  d["files_direct_refused"] = s.files_direct_refused;
  d["used_direct"] = s.used_direct;
  return d;
}

const char* buffer_arg(const py::buffer& b, size_t* n, bool writable) {
  py::buffer_info info = b.request(writable);
  *n = static_cast<size_t>(info.size * info.itemsize);
  return static_cast<const char*>(info.ptr);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "sllm loader core: chunk pool, host buffers, pipelined checkpoint reads, CRC-32C";

  m.def(
      "crc32c",
      [](const py::buffer& data, uint32_t crc) {
        size_t n;
        const char* p = buffer_arg(data, &n, false);
        py::gil_scoped_release nogil;
        return crc32c(crc, p, n);
      },
      py::arg("data"), py::arg("crc") = 0);
  m.def(
      "crc32c_address",
      [](uintptr_t addr, size_t n, uint32_t crc) {
        py::gil_scoped_release nogil;
        return crc32c(crc, reinterpret_cast<const void*>(addr), n);
      },
      py::arg("address"), py::arg("nbytes"), py::arg("crc") = 0);
  m.def(
      "block_crcs",
      [](uintptr_t addr, size_t n, size_t block) {
        std::vector<uint32_t> out;
        py::gil_scoped_release nogil;
        for (size_t off = 0; off < n; off += block)
          out.push_back(crc32c(0, reinterpret_cast<const char*>(addr) + off, std::min(block, n - off)));
        return out;
      },
      py::arg("address"), py::arg("nbytes"), py::arg("block_size"),
      "CRC-32C of each block_size slice of [address, address+nbytes).");
  m.def("crc32c_hardware", &crc32c_hardware);
  m.def(
      "parallel_copy",
      [](uintptr_t dst, uintptr_t src, size_t n, int threads) {
        py::gil_scoped_release nogil;
        parallel_copy(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), n, threads);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("threads") = 2);
  m.def(
      "counters",
      [] {
        GlobalCounters& c = global_counters();
        py::dict d;
        d["bytes_direct"] = c.bytes_direct.load();
        d["bytes_cached"] = c.bytes_cached.load();
        d["bytes_read"] = c.bytes_direct.load() + c.bytes_cached.load();
        d["bytes_copied"] = c.bytes_copied.load();
        d["bytes_verified"] = c.bytes_verified.load();
        d["loads"] = c.loads.load();
        d["failures"] = c.failures.load();
        d["ns_load_wall"] = c.load_clock.ns();
        d["ns_load_sum"] = c.ns_load_sum.load();
        d["ns_read"] = c.read_clock.ns();
        d["ns_read_direct"] = c.direct_clock.ns();
        d["ns_read_cached"] = c.cached_clock.ns();
        d["ns_copy"] = c.copy_clock.ns();
        d["dram_hits"] = c.dram_hits.load();
        d["bytes_dram"] = c.bytes_dram.load();
        d["bytes_h2d"] = c.bytes_h2d.load();
        d["ns_h2d"] = c.ns_h2d.load();
        return d;
      },
      "Process-wide loader counters; every ns_* is elapsed time (overlapping activity counted once).");
  m.def(
      "record_dram_hit",
      [](uint64_t nbytes) {
        global_counters().dram_hits++;
        global_counters().bytes_dram += nbytes;
      },
      py::arg("nbytes"), "Counts one load served from the DRAM chunk pool.");
  m.def(
      "record_h2d",
      [](uint64_t nbytes, uint64_t ns) {
        global_counters().bytes_h2d += nbytes;
        global_counters().ns_h2d += ns;
      },
      py::arg("nbytes"), py::arg("ns"),
      "Counts one load's host -> device copies: bytes, and the time any of them was running on the GPU.");

  py::class_<HostArena, std::shared_ptr<HostArena>>(m, "HostArena")
      .def(py::init<size_t>(), py::arg("capacity_bytes"))
      .def("start_prefault", &HostArena::start_prefault, py::arg("threads") = 1)
      .def_property_readonly("capacity", &HostArena::capacity)
      .def_property_readonly("used", &HostArena::used)
      .def_property_readonly("largest_free", &HostArena::largest_free);

  py::class_<HostBuffer>(m, "HostBuffer", py::buffer_protocol())
      .def(py::init([](size_t nbytes, bool prefault, int threads) {
             py::gil_scoped_release nogil;
             return new HostBuffer(nbytes, prefault, threads);
           }),
           py::arg("nbytes"), py::arg("prefault") = false, py::arg("threads") = 2)
      .def(py::init([](std::shared_ptr<HostArena> arena, size_t nbytes) {
             try {
               return new HostBuffer(std::move(arena), nbytes);
             } catch (const std::bad_alloc&) {
               throw py::value_error("the host arena has no free range of " + std::to_string(nbytes) + " bytes");
             }
           }),
           py::arg("arena"), py::arg("nbytes"))
      .def_property_readonly("address", [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("nbytes", &HostBuffer::nbytes)
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {1});
      });

  py::class_<ChunkPool>(m, "ChunkPool")
      .def(py::init<size_t, size_t>(), py::arg("chunk_size"), py::arg("capacity_bytes"))
      .def("allocate", &ChunkPool::allocate, py::arg("n"), py::call_guard<py::gil_scoped_release>())
      .def("release", &ChunkPool::release, py::arg("ids"), py::call_guard<py::gil_scoped_release>())
      .def("address", [](const ChunkPool& p, int64_t id) { return reinterpret_cast<uintptr_t>(p.address(id)); })
      .def_property_readonly("chunk_size", &ChunkPool::chunk_size)
      .def_property_readonly("capacity_chunks", &ChunkPool::capacity_chunks)
      .def_property_readonly("base_address", &ChunkPool::base)
      .def_property_readonly("mapped_bytes", &ChunkPool::mapped_bytes)
      .def("stats", &pool_stats)
      .def("start_prefault", &ChunkPool::start_prefault, py::arg("threads") = 1)
      .def("wait_prefault", &ChunkPool::wait_prefault, py::call_guard<py::gil_scoped_release>())
      .def("stop_prefault", &ChunkPool::stop_prefault, py::call_guard<py::gil_scoped_release>())
      .def(
          "copy_out",
          [](const ChunkPool& p, const std::vector<int64_t>& chunks, size_t nbytes, uintptr_t dst, int threads) {
            py::gil_scoped_release nogil;
            copy_chunks(p, chunks, nbytes, reinterpret_cast<char*>(dst), threads);
          },
          py::arg("chunks"), py::arg("nbytes"), py::arg("dst"), py::arg("threads") = 2,
          "Copies chunks, in order, into [dst, dst+nbytes).");

  py::class_<FileJob>(m, "FileJob")
      .def(py::init<>())
      .def_readwrite("path", &FileJob::path)
      .def_readwrite("nbytes", &FileJob::nbytes)
      .def_readwrite("block_size", &FileJob::block_size)
      .def_readwrite("crcs", &FileJob::crcs)
      .def_readwrite("dest", &FileJob::dest)
      .def_readwrite("chunks", &FileJob::chunks);

  py::class_<LoadOptions>(m, "LoadOptions")
      .def(py::init<>())
      .def_readwrite("readers", &LoadOptions::readers)
      .def_readwrite("copiers", &LoadOptions::copiers)
      .def_readwrite("io_size", &LoadOptions::io_size)
      .def_readwrite("direct", &LoadOptions::direct)
      .def_readwrite("notify", &LoadOptions::notify)
      .def_readwrite("prefault_dest", &LoadOptions::prefault_dest)
      .def_readwrite("debug_throw", &LoadOptions::debug_throw)
      .def_readwrite("debug_throw_foreign", &LoadOptions::debug_throw_foreign)
      .def_readwrite("debug_refuse_direct_job", &LoadOptions::debug_refuse_direct_job);

  // keep_alive<1, 3>: the task holds the pool alive while it runs.
  py::class_<LoadTask>(m, "LoadTask")
      .def(py::init<std::vector<FileJob>, ChunkPool*, LoadOptions, std::vector<int64_t>>(), py::arg("jobs"),
           py::arg("pool"), py::arg("options"), py::arg("ring") = std::vector<int64_t>{}, py::keep_alive<1, 3>())
      .def("cancel", &LoadTask::cancel)
      .def("wait", &LoadTask::wait, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("done", &LoadTask::done)
      .def(
          "next_completed",
          [](LoadTask& t, double timeout_s) -> py::object {
            std::optional<Completed> item;
            {
              py::gil_scoped_release nogil;
              item = t.next_completed(std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
            }
            if (!item) return py::none();
            return py::make_tuple(item->job, item->index, item->chunk);
          },
          py::arg("timeout_s") = 1.0, "(job, unit, chunk) of the next finished unit; (-1, -1, -1) at the end.")
      .def("recycle", &LoadTask::recycle, py::arg("chunk"), "Ring mode: the chunk's contents were consumed.")
      .def_property_readonly("error_kind", &LoadTask::error_kind)
      .def_property_readonly("error_message", &LoadTask::error_message)
      .def("stats", &load_stats);
}
