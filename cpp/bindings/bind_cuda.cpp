// tiltsmc._cuda: the CUDA kernels for Python. Pointers arrive as integers (python/tiltsmc/core.py reads
// them from __cuda_array_interface__ or an OrtValue and validates shapes, dtypes and devices); this
// layer selects the device, launches on the given stream with the GIL released, reads the error record
// back and maps it to the same ValueError the CPU kernels raise.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "common.hpp"
#include "tiltsmc_cuda.hpp"

namespace tiltsmc::bindings {
namespace {

namespace cu = tiltsmc::cuda;

cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }
template <typename P>
P* as_pointer(std::uintptr_t address) {
    return reinterpret_cast<P*>(address);
}

// Makes `device` current for the scope, then restores the previous one.
class DeviceScope {
public:
    explicit DeviceScope(int device) {
        cu::check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
        if (device != previous_) cu::check_cuda(cudaSetDevice(device), "cudaSetDevice");
    }
    ~DeviceScope() { cudaSetDevice(previous_); }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

private:
    int previous_ = 0;
};

// Runs launch(record) on `stream` of `device` without the GIL; with check, waits for the stream and
// raises the first input error as the CPU kernel would (named after `argument`, positions `width` wide).
template <typename Launch>
void run_checked(int device, std::uintptr_t stream_handle, bool check_input, const char* kernel, const char* argument,
                 std::int64_t width, Launch&& launch) {
    cu::ErrorRecord value = cu::kNoError;
    {
        py::gil_scoped_release release;
        DeviceScope scope(device);
        const cudaStream_t stream = as_stream(stream_handle);
        if (!check_input) {
            launch(static_cast<cu::ErrorRecord*>(nullptr), stream);
            return;
        }
        cu::ErrorRecord* record = cu::new_error_record(stream);
        try {
            launch(record, stream);
            value = cu::read_error_record(record, stream, kernel);
        } catch (...) {
            cudaFreeAsync(record, stream);
            throw;
        }
        cu::free_async(record, stream);
    }
    check(cu::decode_error_record(value, width), argument);
}

void bind_log_normalize(std::uintptr_t logw, std::int64_t rows, std::int64_t n, bool is_double, bool allow_zero_rows,
                        std::uintptr_t normalised, std::uintptr_t log_mean_w, std::uintptr_t ess, int device,
                        std::uintptr_t stream) {
    run_checked(device, stream, true, "tiltsmc._cuda.log_normalize", "logw", n, [&](auto* record, cudaStream_t s) {
        if (is_double)
            cu::log_normalize(as_pointer<const double>(logw), rows, n, allow_zero_rows, as_pointer<double>(normalised),
                              as_pointer<double>(log_mean_w), as_pointer<double>(ess), record, s);
        else
            cu::log_normalize(as_pointer<const float>(logw), rows, n, allow_zero_rows, as_pointer<float>(normalised),
                              as_pointer<double>(log_mean_w), as_pointer<double>(ess), record, s);
    });
}

void bind_resample(std::uintptr_t logw, std::int64_t rows, std::int64_t n, bool is_double, int scheme,
                   std::int64_t num, std::uint64_t key, std::uintptr_t ancestors, int device, std::uintptr_t stream) {
    if (scheme < 0 || scheme > 3) throw py::value_error("scheme: unknown scheme code");
    if (num < 1) throw py::value_error("num: must be >= 1");
    run_checked(device, stream, true, "tiltsmc._cuda.resample", "logw", n, [&](auto* record, cudaStream_t s) {
        if (is_double)
            cu::resample(as_pointer<const double>(logw), rows, n, static_cast<Scheme>(scheme), num, key,
                         as_pointer<std::int64_t>(ancestors), record, s);
        else
            cu::resample(as_pointer<const float>(logw), rows, n, static_cast<Scheme>(scheme), num, key,
                         as_pointer<std::int64_t>(ancestors), record, s);
    });
}

void bind_smc_step(std::uintptr_t log_w, std::int64_t rows, std::int64_t n, bool is_double, double threshold,
                   int scheme, std::uint64_t key, std::uintptr_t ancestors, std::uintptr_t resampled,
                   std::uintptr_t log_mean_w, std::uintptr_t ess, std::uintptr_t unique, int device,
                   std::uintptr_t stream, bool check) {
    if (scheme < 0 || scheme > 3) throw py::value_error("scheme: unknown scheme code");
    run_checked(device, stream, check, "tiltsmc._cuda.smc_step", "log_w", n, [&](auto* record, cudaStream_t s) {
        auto* a = as_pointer<std::int64_t>(ancestors);
        auto* r = as_pointer<std::uint8_t>(resampled);
        auto* lm = as_pointer<double>(log_mean_w);
        auto* e = as_pointer<double>(ess);
        auto* u = as_pointer<std::int64_t>(unique);
        if (is_double)
            cu::smc_step(as_pointer<double>(log_w), rows, n, threshold, static_cast<Scheme>(scheme), key, a, r, lm, e,
                         u, record, s);
        else
            cu::smc_step(as_pointer<float>(log_w), rows, n, threshold, static_cast<Scheme>(scheme), key, a, r, lm, e,
                         u, record, s);
    });
}

void bind_pool_select(std::uintptr_t logw, std::int64_t rows, std::int64_t n, bool is_double, std::uint64_t key,
                      std::uintptr_t index, std::uintptr_t log_mean_w, int device, std::uintptr_t stream) {
    run_checked(device, stream, true, "tiltsmc._cuda.pool_select", "logw", n, [&](auto* record, cudaStream_t s) {
        if (is_double)
            cu::pool_select(as_pointer<const double>(logw), rows, n, key, as_pointer<std::int64_t>(index),
                            as_pointer<double>(log_mean_w), record, s);
        else
            cu::pool_select(as_pointer<const float>(logw), rows, n, key, as_pointer<std::int64_t>(index),
                            as_pointer<double>(log_mean_w), record, s);
    });
}

void bind_mh_accept(std::uintptr_t current, std::uintptr_t proposed, std::int64_t rows, std::uint64_t key,
                    std::uintptr_t accept, int device, std::uintptr_t stream) {
    cu::ErrorRecord value = cu::kNoError;
    {
        py::gil_scoped_release release;
        DeviceScope scope(device);
        const cudaStream_t s = as_stream(stream);
        cu::ErrorRecord* record = cu::new_error_record(s);
        try {
            cu::mh_accept(as_pointer<const double>(current), as_pointer<const double>(proposed), rows, key,
                          as_pointer<std::uint8_t>(accept), record, s);
            value = cu::read_error_record(record, s, "tiltsmc._cuda.mh_accept");
        } catch (...) {
            cudaFreeAsync(record, s);
            throw;
        }
        cu::free_async(record, s);
    }
    const Status status = cu::decode_error_record(value, 2);
    if (!status.ok()) {
        const std::string name = status.index == 0 ? "log_z_current" : "log_z_proposed";
        const std::string what = status.code == StatusCode::nan_weight ? ": NaN" : ": +inf";
        throw py::value_error(name + what + " at row " + std::to_string(status.row));
    }
}

// in_place: out is x (the caller knows; equal pointers do not say so, as arrays of no bytes may all be at 0).
void bind_gather(std::uintptr_t x, std::int64_t rows, std::int64_t n, std::int64_t item_bytes,
                 std::uintptr_t ancestors, std::int64_t m, std::uintptr_t out, bool in_place, int device,
                 std::uintptr_t stream) {
    if (rows < 0 || n < 1 || m < 0 || item_bytes < 0) throw py::value_error("x: invalid rows, particles or item size");
    if (in_place && x != out) throw py::value_error("out: in-place gather needs out to be x");
    if (in_place && m != n) throw py::value_error("out: in-place gather needs as many ancestors as particles");
    // The ancestors are checked on the device, then read again by the copy: out must not overlap them (nor x,
    // unless it is x). Byte ranges of the C-contiguous arrays these sizes describe.
    const auto* x_begin = as_pointer<const void>(x);
    const auto* out_begin = as_pointer<const void>(out);
    const auto x_size = checked_product({rows, n, item_bytes}), out_size = checked_product({rows, m, item_bytes});
    const auto ancestors_size = checked_product({rows, m, static_cast<std::int64_t>(sizeof(std::int64_t))});
    if (!x_size || !out_size || !ancestors_size) throw py::value_error("x: rows x particles x item size overflows");
    const std::int64_t x_bytes = *x_size, out_bytes = *out_size;
    if (!in_place && share_memory(x_begin, x_bytes, out_begin, out_bytes))
        throw py::value_error("out: overlaps x without being x itself");
    if (share_memory(as_pointer<const void>(ancestors), *ancestors_size, out_begin, out_bytes))
        throw py::value_error(in_place ? "ancestors: shares memory with x, which is reordered in place (pass a copy)"
                                       : "out: shares memory with ancestors (pass separate arrays)");
    if (rows == 0 || m == 0) return;  // no ancestors to check, nothing to write: no device work
    run_checked(device, stream, true, "tiltsmc._cuda.gather", "ancestors", m, [&](auto* record, cudaStream_t s) {
        cu::gather(as_pointer<const std::uint8_t>(x), rows, n, item_bytes, as_pointer<const std::int64_t>(ancestors),
                   m, as_pointer<std::uint8_t>(out), in_place, record, s);
    });
}

// Device memory owned by Python: allocated on a stream from the device's pool and given back on that
// stream (or, if the stream is gone, after the device is idle).
class DeviceBuffer {
public:
    DeviceBuffer(std::int64_t nbytes, int device, std::uintptr_t stream) : nbytes_(nbytes), device_(device), stream_(stream) {
        if (nbytes < 0) throw py::value_error("nbytes: must be >= 0");
        DeviceScope scope(device);
        pointer_ = cu::malloc_async(static_cast<std::size_t>(nbytes > 0 ? nbytes : 1), as_stream(stream));
    }
    ~DeviceBuffer() {
        int previous = 0;
        cudaGetDevice(&previous);
        cudaSetDevice(device_);
        if (cudaFreeAsync(pointer_, as_stream(stream_)) != cudaSuccess) {
            cudaGetLastError();
            cudaDeviceSynchronize();
            cudaFree(pointer_);
            cudaGetLastError();
        }
        cudaSetDevice(previous);
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    std::uintptr_t pointer() const { return reinterpret_cast<std::uintptr_t>(pointer_); }
    std::int64_t nbytes() const { return nbytes_; }
    int device() const { return device_; }
    std::uintptr_t stream() const { return stream_; }

private:
    void* pointer_ = nullptr;
    std::int64_t nbytes_;
    int device_;
    std::uintptr_t stream_;
};

// Copies between host memory (a C-contiguous numpy array) and device memory, waiting for the stream.
void copy_bytes(std::uintptr_t target, std::uintptr_t source, std::int64_t nbytes, bool to_host, int device,
                std::uintptr_t stream) {
    py::gil_scoped_release release;
    DeviceScope scope(device);
    const cudaStream_t s = as_stream(stream);
    cu::check_cuda(cudaMemcpyAsync(as_pointer<void>(target), as_pointer<const void>(source),
                                   static_cast<std::size_t>(nbytes),
                                   to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, s),
                   "cudaMemcpyAsync");
    cu::check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

// Copies nbytes within device memory, waiting for the stream.
void copy_device(std::uintptr_t target, std::uintptr_t source, std::int64_t nbytes, int device,
                 std::uintptr_t stream) {
    py::gil_scoped_release release;
    DeviceScope scope(device);
    const cudaStream_t s = as_stream(stream);
    cu::check_cuda(cudaMemcpyAsync(as_pointer<void>(target), as_pointer<const void>(source),
                                   static_cast<std::size_t>(nbytes), cudaMemcpyDeviceToDevice, s),
                   "cudaMemcpyAsync");
    cu::check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

// Waits until everything queued on the stream has run (e.g. stream-ordered allocations, before another
// library's stream uses the memory).
void synchronize(int device, std::uintptr_t stream) {
    py::gil_scoped_release release;
    DeviceScope scope(device);
    cu::check_cuda(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
}

}  // namespace
}  // namespace tiltsmc::bindings

PYBIND11_MODULE(_cuda, m) {
    namespace py = pybind11;
    namespace tb = tiltsmc::bindings;
    namespace cu = tiltsmc::cuda;
    m.doc() = "tiltsmc CUDA kernels (use tiltsmc.core, which validates arguments and reads device arrays)";
    py::register_exception<cu::CudaError>(m, "CudaError", PyExc_RuntimeError);
    m.def("probe", []() -> py::tuple {
        const cu::Availability a = cu::probe();
        return py::make_tuple(a.usable, a.reason, a.device_count);
    });
    m.def("pointer_device", [](std::uintptr_t pointer) { return cu::pointer_device(reinterpret_cast<void*>(pointer)); },
          py::arg("pointer"));
    m.def("stream_device", [](std::uintptr_t stream) { return cu::stream_device(reinterpret_cast<cudaStream_t>(stream)); },
          py::arg("stream"));
    m.def("log_normalize", &tb::bind_log_normalize, py::arg("logw"), py::arg("rows"), py::arg("n"),
          py::arg("is_double"), py::arg("allow_zero_rows"), py::arg("normalised"), py::arg("log_mean_w"),
          py::arg("ess"), py::arg("device"), py::arg("stream"));
    m.def("resample", &tb::bind_resample, py::arg("logw"), py::arg("rows"), py::arg("n"), py::arg("is_double"),
          py::arg("scheme"), py::arg("num"), py::arg("key"), py::arg("ancestors"), py::arg("device"),
          py::arg("stream"));
    m.def("smc_step", &tb::bind_smc_step, py::arg("log_w"), py::arg("rows"), py::arg("n"), py::arg("is_double"),
          py::arg("threshold"), py::arg("scheme"), py::arg("key"), py::arg("ancestors"), py::arg("resampled"),
          py::arg("log_mean_w"), py::arg("ess"), py::arg("unique"), py::arg("device"), py::arg("stream"),
          py::arg("check"));
    m.def("pool_select", &tb::bind_pool_select, py::arg("logw"), py::arg("rows"), py::arg("n"), py::arg("is_double"),
          py::arg("key"), py::arg("index"), py::arg("log_mean_w"), py::arg("device"), py::arg("stream"));
    m.def("mh_accept", &tb::bind_mh_accept, py::arg("log_z_current"), py::arg("log_z_proposed"), py::arg("rows"),
          py::arg("key"), py::arg("accept"), py::arg("device"), py::arg("stream"));
    m.def("gather", &tb::bind_gather, py::arg("x"), py::arg("rows"), py::arg("n"), py::arg("item_bytes"),
          py::arg("ancestors"), py::arg("m"), py::arg("out"), py::arg("in_place"), py::arg("device"),
          py::arg("stream"));
    m.def("copy_bytes", &tb::copy_bytes, py::arg("target"), py::arg("source"), py::arg("nbytes"), py::arg("to_host"),
          py::arg("device"), py::arg("stream"));
    m.def("copy_device", &tb::copy_device, py::arg("target"), py::arg("source"), py::arg("nbytes"), py::arg("device"),
          py::arg("stream"));
    m.def("synchronize", &tb::synchronize, py::arg("device"), py::arg("stream"));
    py::class_<tb::DeviceBuffer>(m, "DeviceBuffer")
        .def(py::init<std::int64_t, int, std::uintptr_t>(), py::arg("nbytes"), py::arg("device"), py::arg("stream"))
        .def_property_readonly("ptr", &tb::DeviceBuffer::pointer)
        .def_property_readonly("nbytes", &tb::DeviceBuffer::nbytes)
        .def_property_readonly("device", &tb::DeviceBuffer::device)
        .def_property_readonly("stream", &tb::DeviceBuffer::stream);
}
