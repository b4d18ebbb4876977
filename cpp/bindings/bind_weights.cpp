// Bindings of log_normalize, row_statistics, resample, pool_select, sample_logits, mh_accept, smc_step and
// smc_reweight.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common.hpp"

namespace tiltsmc::bindings {
namespace {

// Refuses (ValueError naming it) a (B, N) array whose rows hold nothing (N = 0): the kernels need N >= 1.
void require_columns(const py::array& array, const char* name, const char* item) {
    if (array.shape(1) >= 1) return;
    throw py::value_error(std::string(name) + ": rows must hold at least one " + item + ", got shape (" +
                          std::to_string(array.shape(0)) + ", 0)");
}

template <typename T>
std::tuple<CArray<T>, CArray<double>, CArray<double>> bind_log_normalize(const CArray<T>& logw,
                                                                           bool allow_zero_rows) {
    if (logw.ndim() != 2) throw py::value_error("logw: expected a 2-D array");
    require_columns(logw, "logw", "particle");
    const std::int64_t rows = logw.shape(0), n = logw.shape(1);
    CArray<T> normalised({rows, n});
    CArray<double> log_mean_w(rows), ess(rows);
    const T* in = logw.data();
    T* out = normalised.mutable_data();
    double* lm = log_mean_w.mutable_data();
    double* e = ess.mutable_data();
    Status status;
    {
        GilReleasedFor release(2 * rows * n * static_cast<std::int64_t>(sizeof(T)));
        status = log_normalize(in, rows, n, allow_zero_rows, out, lm, e);
    }
    check(status, "logw");
    return {normalised, log_mean_w, ess};
}

// log_mean_w and ess only (no normalised copy): the samplers' per-step statistics.
template <typename T>
std::tuple<CArray<double>, CArray<double>> bind_row_statistics(const CArray<T>& logw) {
    if (logw.ndim() != 2) throw py::value_error("logw: expected a 2-D array");
    require_columns(logw, "logw", "particle");
    const std::int64_t rows = logw.shape(0), n = logw.shape(1);
    CArray<double> log_mean_w(rows), ess(rows);
    const T* in = logw.data();
    double* lm = log_mean_w.mutable_data();
    double* e = ess.mutable_data();
    Status status;
    {
        GilReleasedFor release(rows * n * static_cast<std::int64_t>(sizeof(T)));
        status = log_normalize<T>(in, rows, n, true, nullptr, lm, e);
    }
    check(status, "logw");
    return {log_mean_w, ess};
}

template <typename T>
CArray<std::int64_t> bind_resample(const CArray<T>& logw, int scheme, std::int64_t num, std::uint64_t key) {
    if (logw.ndim() != 2) throw py::value_error("logw: expected a 2-D array");
    require_columns(logw, "logw", "particle");
    if (scheme < 0 || scheme > 3) throw py::value_error("scheme: unknown scheme code");
    if (num < 1) throw py::value_error("num: must be >= 1");
    const std::int64_t rows = logw.shape(0), n = logw.shape(1);
    CArray<std::int64_t> ancestors({rows, num});
    const T* in = logw.data();
    std::int64_t* out = ancestors.mutable_data();
    Status status;
    {
        GilReleasedFor release(rows * (n * static_cast<std::int64_t>(sizeof(T)) + num * 8));
        status = resample(in, rows, n, static_cast<Scheme>(scheme), num, key, out);
    }
    check(status, "logw");
    return ancestors;
}

// Per-row streams of a batch of independent runs (keys and counters, uint64, one each per row), or none.
struct RowStreamArrays {
    py::array keys, counters;
    const std::uint64_t* key_data = nullptr;
    const std::uint64_t* counter_data = nullptr;
};

RowStreamArrays row_stream_arrays(const py::handle& keys_object, const py::handle& counters_object, std::int64_t rows,
                                  const std::string& of) {
    if (keys_object.is_none() != counters_object.is_none())
        throw py::value_error("keys: keys and counters go together (one stream per row)");
    RowStreamArrays streams;
    if (keys_object.is_none()) return streams;
    streams.keys = checked<std::uint64_t>(keys_object, "keys");
    streams.counters = checked<std::uint64_t>(counters_object, "counters");
    if (size_of(streams.keys) != rows) throw py::value_error("keys: expected one entry per row of " + of);
    if (size_of(streams.counters) != rows) throw py::value_error("counters: expected one entry per row of " + of);
    streams.key_data = static_cast<const std::uint64_t*>(streams.keys.data());
    streams.counter_data = static_cast<const std::uint64_t*>(streams.counters.data());
    return streams;
}

template <typename T>
std::tuple<CArray<std::int64_t>, CArray<double>> bind_pool_select(const CArray<T>& logw, std::uint64_t key,
                                                                  const py::object& keys_object,
                                                                  const py::object& counters_object) {
    if (logw.ndim() != 2) throw py::value_error("logw: expected a 2-D array");
    require_columns(logw, "logw", "particle");
    const std::int64_t rows = logw.shape(0), n = logw.shape(1);
    const RowStreamArrays streams = row_stream_arrays(keys_object, counters_object, rows, "logw");
    CArray<std::int64_t> index(rows);
    CArray<double> log_mean_w(rows);
    const T* in = logw.data();
    std::int64_t* idx = index.mutable_data();
    double* lm = log_mean_w.mutable_data();
    Status status;
    {
        GilReleasedFor release(rows * n * static_cast<std::int64_t>(sizeof(T)));
        status = pool_select(in, rows, n, key, idx, lm, streams.key_data, streams.counter_data);
    }
    check(status, "logw");
    return {index, log_mean_w};
}

template <typename T>
std::tuple<CArray<std::int64_t>, CArray<double>> bind_sample_logits(const CArray<T>& logits, double temperature,
                                                                    std::uint64_t key, const py::object& active_object,
                                                                    const py::object& keys_object,
                                                                    const py::object& counters_object) {
    if (logits.ndim() != 2) throw py::value_error("logits: expected a 2-D array");
    require_columns(logits, "logits", "logit");
    if (!(temperature > 0.0) || !std::isfinite(temperature))
        throw py::value_error("temperature: must be a finite number > 0");
    const std::int64_t rows = logits.shape(0), n = logits.shape(1);
    CArray<std::int64_t> index(rows);
    CArray<double> log_prob(rows);
    const T* in = logits.data();
    std::int64_t* idx = index.mutable_data();
    double* lp = log_prob.mutable_data();
    const std::uint8_t* active = nullptr;
    py::array active_array;
    if (!active_object.is_none()) {
        if (!py::isinstance<py::array>(active_object)) throw py::type_error("where: expected a numpy bool array");
        active_array = py::reinterpret_borrow<py::array>(active_object);
        if (active_array.dtype().kind() != 'b' || !(active_array.flags() & py::array::c_style))
            throw py::type_error("where: expected a C-contiguous bool array");
        if (static_cast<std::int64_t>(active_array.size()) != rows)
            throw py::value_error("where: expected one entry per row of logits");
        active_array = readable(active_array);  // bool: one byte, always aligned (a flag test)
        active = static_cast<const std::uint8_t*>(active_array.data());
    }
    const RowStreamArrays streams = row_stream_arrays(keys_object, counters_object, rows, "logits");
    Status status;
    {
        GilReleasedFor release(rows * n * static_cast<std::int64_t>(sizeof(T)));
        status = sample_logits(in, rows, n, temperature, key, active, idx, lp, streams.key_data, streams.counter_data);
    }
    check(status, "logits");
    return {index, log_prob};
}

CArray<bool> bind_mh_accept(const CArray<double>& current, const CArray<double>& proposed, std::uint64_t key) {
    if (current.ndim() != 1 || proposed.ndim() != 1 || current.shape(0) != proposed.shape(0))
        throw py::value_error("log_z_proposed: shape does not match log_z_current");
    const std::int64_t rows = current.shape(0);
    std::vector<std::uint8_t> accept(static_cast<std::size_t>(rows));
    const Status status = mh_accept(current.data(), proposed.data(), rows, key, accept.data());
    if (!status.ok()) {
        const std::string name = status.index == 0 ? "log_z_current" : "log_z_proposed";
        const std::string what = status.code == StatusCode::nan_weight ? ": NaN" : ": +inf";
        throw py::value_error(name + what + " at row " + std::to_string(status.row));
    }
    CArray<bool> result(rows);
    bool* out = result.mutable_data();
    for (std::int64_t r = 0; r < rows; ++r) out[r] = accept[static_cast<std::size_t>(r)] != 0;
    return result;
}

template <typename T>
py::tuple smc_step_typed(py::array& log_w, double threshold, int scheme, std::uint64_t key, bool survivors_stay) {
    const std::int64_t rows = log_w.shape(0), n = log_w.shape(1);
    CArray<std::int64_t> ancestors({rows, n}), unique(rows);
    CArray<bool> resampled(rows);
    CArray<double> log_mean_w(rows), ess(rows);
    std::vector<std::uint8_t> flags(static_cast<std::size_t>(rows));
    T* x = static_cast<T*>(log_w.mutable_data());
    std::int64_t* a = ancestors.mutable_data();
    std::int64_t* u = unique.mutable_data();
    double* lm = log_mean_w.mutable_data();
    double* e = ess.mutable_data();
    Status status;
    {
        GilReleasedFor release(rows * n * (static_cast<std::int64_t>(sizeof(T)) + 8));  // weights, ancestors
        status = smc_step(x, rows, n, threshold, static_cast<Scheme>(scheme), key, survivors_stay, a, flags.data(), lm,
                          e, u);
    }
    check(status, "log_w");
    bool* r = resampled.mutable_data();
    for (std::int64_t k = 0; k < rows; ++k) r[k] = flags[static_cast<std::size_t>(k)] != 0;
    return py::make_tuple(ancestors, resampled, log_mean_w, ess, unique);
}

// log_w (B, N) float32 or float64 is reset in place where a row is resampled, so it is taken as it is, never
// converted: a converted copy would be reset instead, and the caller's array left as it was.
py::tuple bind_smc_step(const py::handle& log_w_object, double threshold, int scheme, std::uint64_t key,
                        bool survivors_stay) {
    if (!py::isinstance<py::array>(log_w_object)) throw py::type_error("log_w: expected a numpy array");
    auto log_w = py::reinterpret_borrow<py::array>(log_w_object);
    const bool is_double = has_dtype(log_w, py::dtype::of<double>());
    if (!is_double && !has_dtype(log_w, py::dtype::of<float>())) {
        const py::dtype dtype = log_w.dtype();
        const bool swapped = !dtype.attr("isnative").cast<bool>();
        throw py::type_error("log_w: expected float32 or float64 in the machine's byte order (it is reset in place, "
                             "never converted), got " + std::string(py::str(dtype.attr("name"))) +
                             (swapped ? " in the other byte order (" + std::string(py::str(dtype.attr("str"))) + ")" : ""));
    }
    if (log_w.ndim() != 2) throw py::value_error("log_w: expected a 2-D array");
    if (!(log_w.flags() & py::array::c_style))
        throw py::value_error("log_w: must be C-contiguous (it is reset in place, never copied)");
    if (!log_w.writeable()) throw py::value_error("log_w: must be writeable (resampled rows are reset)");
    require_aligned(log_w, "log_w");
    require_columns(log_w, "log_w", "particle");
    if (scheme < 0 || scheme > 3) throw py::value_error("scheme: unknown scheme code");
    return is_double ? smc_step_typed<double>(log_w, threshold, scheme, key, survivors_stay)
                     : smc_step_typed<float>(log_w, threshold, scheme, key, survivors_stay);
}

// An optional (B,) per-row setting of smc_reweight (None: absent), checked: its dtype, C order and size.
template <typename T>
py::array per_row_array(const py::handle& object, const char* name, std::int64_t rows) {
    if (object.is_none()) return py::array();
    py::array array = checked<T>(object, name);
    if (size_of(array) != rows) throw py::value_error(std::string(name) + ": expected one entry per row (B,)");
    return array;
}

// smc_reweight on float64 (B, N) arrays; the 1-D (B,) ones are updated in place. Every array is checked here;
// keys, counters (uint64), thresholds (float64) and schemes (uint8 codes) are optional per-row settings (named
// ess_threshold and scheme in errors, as in tiltsmc.core.smc_reweight).
py::tuple bind_smc_reweight(const py::handle& log_w_object, const py::handle& log_v_object,
                            const py::handle& log_v_prev_object, const py::handle& live_object,
                            const py::handle& log_total_object, const py::handle& log_z_object,
                            const py::handle& collapsed_object, double log_n, double threshold, int scheme,
                            std::uint64_t key, const py::handle& increment_se_object, const py::handle& keys_object,
                            const py::handle& counters_object, const py::handle& thresholds_object,
                            const py::handle& schemes_object) {
    py::array log_w = checked<double>(log_w_object, "log_w", true);
    if (log_w.ndim() != 2 || log_w.shape(1) < 1) throw py::value_error("log_w: expected shape (B, N) with N >= 1");
    const std::int64_t rows = log_w.shape(0), n = log_w.shape(1);
    py::array log_v = checked<double>(log_v_object, "log_v");
    py::array log_v_prev = checked<double>(log_v_prev_object, "log_v_prev", true);
    py::array live = checked<bool>(live_object, "live");
    for (const auto& [array, name] : {std::pair{&log_v, "log_v"}, std::pair{&log_v_prev, "log_v_prev"}, std::pair{&live, "live"}})
        if (size_of(*array) != rows * n) throw py::value_error(std::string(name) + ": expected log_w's shape (B, N)");
    py::array log_total = checked<double>(log_total_object, "log_total", true);
    py::array log_z = checked<double>(log_z_object, "log_z", true);
    py::array collapsed = checked<bool>(collapsed_object, "collapsed", true);
    for (const auto& [array, name] :
         {std::pair{&log_total, "log_total"}, std::pair{&log_z, "log_z"}, std::pair{&collapsed, "collapsed"}})
        if (size_of(*array) != rows) throw py::value_error(std::string(name) + ": expected (B,)");
    if (scheme < 0 || scheme > 3) throw py::value_error("scheme: unknown scheme code");
    const RowStreamArrays streams = row_stream_arrays(keys_object, counters_object, rows, "log_w");
    py::array thresholds = per_row_array<double>(thresholds_object, "ess_threshold", rows);
    py::array schemes = per_row_array<std::uint8_t>(schemes_object, "scheme", rows);
    if (!thresholds_object.is_none()) {
        const auto* t = static_cast<const double*>(thresholds.data());
        for (std::int64_t r = 0; r < rows; ++r)
            if (!(t[r] >= 0.0)) throw py::value_error("ess_threshold: expected fractions >= 0 (row " + std::to_string(r) + ")");
    }
    if (!schemes_object.is_none()) {
        const auto* codes = static_cast<const std::uint8_t*>(schemes.data());
        for (std::int64_t r = 0; r < rows; ++r)
            if (codes[r] > 3) throw py::value_error("scheme: unknown scheme code at row " + std::to_string(r));
    }
    py::array increment_se;  // optional output
    if (!increment_se_object.is_none()) {
        increment_se = checked<double>(increment_se_object, "increment_se", true);
        if (size_of(increment_se) != rows) throw py::value_error("increment_se: expected (B,)");
    }
    check_disjoint({{&log_w, "log_w"}, {&log_v_prev, "log_v_prev"}, {&log_total, "log_total"}, {&log_z, "log_z"},
                    {&collapsed, "collapsed"}, {&increment_se, "increment_se"}},
                   {{&log_v, "log_v"}, {&live, "live"}, {&streams.keys, "keys"}, {&streams.counters, "counters"},
                    {&thresholds, "ess_threshold"}, {&schemes, "scheme"}});
    RowSettings per_row;
    per_row.keys = streams.key_data;
    per_row.counters = streams.counter_data;
    if (!thresholds_object.is_none()) per_row.thresholds = static_cast<const double*>(thresholds.data());
    if (!schemes_object.is_none()) per_row.schemes = static_cast<const std::uint8_t*>(schemes.data());
    double* se = increment_se_object.is_none() ? nullptr : static_cast<double*>(increment_se.mutable_data());
    CArray<std::int64_t> ancestors({rows, n}), unique(rows);
    CArray<bool> resampled(rows);
    CArray<double> ess(rows), increment(rows);
    std::vector<std::uint8_t> flags(static_cast<std::size_t>(rows));
    auto* w = static_cast<double*>(log_w.mutable_data());
    const auto* v = static_cast<const double*>(log_v.data());
    auto* v_prev = static_cast<double*>(log_v_prev.mutable_data());
    const auto* alive = static_cast<const std::uint8_t*>(live.data());
    Status status;
    {
        GilReleasedFor release(rows * n * 33);  // log_w, log_v, log_v_prev, live and ancestors
        status = smc_reweight(w, rows, n, v, v_prev, alive, log_n, threshold, static_cast<Scheme>(scheme), key,
                              static_cast<double*>(log_total.mutable_data()), static_cast<double*>(log_z.mutable_data()),
                              static_cast<std::uint8_t*>(collapsed.mutable_data()), ancestors.mutable_data(), flags.data(),
                              ess.mutable_data(), unique.mutable_data(), increment.mutable_data(), se, per_row);
    }
    // a value the kernel refused: which of the three inputs made it (an input changed meanwhile has no index)
    const bool refused_value = status.code == StatusCode::nan_weight || status.code == StatusCode::positive_infinity;
    if (refused_value && status.row >= 0 && status.row < rows && status.index >= 0 && status.index < n) {
        const std::int64_t k = status.row * n + status.index;
        auto bad = [](double value) { return std::isnan(value) || value == std::numeric_limits<double>::infinity(); };
        if (!bad(w[k]) && !bad(v[k]) && !bad(v_prev[k]))
            throw py::value_error("log_w: log_w + log_v - log_v_prev is not a log-weight (NaN or +inf: overflow) at row " +
                                  std::to_string(status.row) + ", index " + std::to_string(status.index));
        raise_status(status, bad(w[k]) ? "log_w" : bad(v[k]) ? "log_v" : "log_v_prev");
    }
    check(status, "log_w");
    bool* r = resampled.mutable_data();
    for (std::int64_t k = 0; k < rows; ++k) r[k] = flags[static_cast<std::size_t>(k)] != 0;
    return py::make_tuple(ancestors, resampled, ess, unique, increment);
}

template <typename T>
void register_dtype(py::module_& m) {
    m.def("log_normalize", &bind_log_normalize<T>, py::arg("logw"), py::arg("allow_zero_rows"));
    m.def("row_statistics", &bind_row_statistics<T>, py::arg("logw"));
    m.def("resample", &bind_resample<T>, py::arg("logw"), py::arg("scheme"), py::arg("num"), py::arg("key"));
    m.def("pool_select", &bind_pool_select<T>, py::arg("logw"), py::arg("key"), py::arg("keys") = py::none(),
          py::arg("counters") = py::none());
    m.def("sample_logits", &bind_sample_logits<T>, py::arg("logits"), py::arg("temperature"), py::arg("key"),
          py::arg("active"), py::arg("keys") = py::none(), py::arg("counters") = py::none());
}

}  // namespace

void register_weights(py::module_& m) {
    m.def("smc_reweight", &bind_smc_reweight, py::arg("log_w"), py::arg("log_v"), py::arg("log_v_prev"),
          py::arg("live"), py::arg("log_total"), py::arg("log_z"), py::arg("collapsed"), py::arg("log_n"),
          py::arg("threshold"), py::arg("scheme"), py::arg("key"), py::arg("increment_se") = py::none(),
          py::arg("keys") = py::none(), py::arg("counters") = py::none(), py::arg("thresholds") = py::none(),
          py::arg("schemes") = py::none());
    m.def("smc_step", &bind_smc_step, py::arg("log_w"), py::arg("threshold"), py::arg("scheme"), py::arg("key"),
          py::arg("survivors_stay"));
    register_dtype<double>(m);
    register_dtype<float>(m);
    m.def("mh_accept", &bind_mh_accept, py::arg("log_z_current"), py::arg("log_z_proposed"), py::arg("key"));
}

}  // namespace tiltsmc::bindings
