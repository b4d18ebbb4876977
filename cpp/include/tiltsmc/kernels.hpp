// The tiltsmc core: batched kernels on plain pointers and sizes, no Python.
//
// Every kernel takes `rows` independent rows of `n` particles stored row-major. Log-weights are
// unnormalised natural logs of non-negative weights: -inf is weight zero, NaN and +inf are errors.
// Kernels validate their whole input before writing any output and report problems through Status;
// they never read or write outside the ranges their size arguments describe. Arrays a kernel writes must not
// share memory with one another or with its inputs (the bindings refuse such calls), except where a kernel
// says otherwise. Each index a kernel takes from its arguments is read once and checked where it is used
// (read_once.hpp): another thread rewriting the arguments during the call makes the results meaningless,
// may leave outputs partly written and is then reported as input_changed, but never makes a kernel read
// or write out of bounds.
//
// Flags (std::uint8_t arrays: live, active, still, finished, collapsed; numpy bool arrays in Python) are read
// as `byte != 0`, as numpy reads a bool: any byte value is safe and nonzero means set (a uint8 array viewed as
// bool may hold 2 or 255). Flags a kernel writes are 0 or 1. Typed arrays (double*, std::int64_t*, ...) must
// be aligned to their item size (the bindings copy or refuse unaligned ones); byte arrays (std::uint8_t* data
// of gather, reorder_in_place, concatenate_padded) need no alignment. A pointer to no items may be null.
#pragma once

#include <cstdint>

namespace tiltsmc {

enum class StatusCode : int {
    ok = 0,
    nan_weight,          // a NaN log-weight at (row, index)
    positive_infinity,   // a +inf log-weight at (row, index)
    zero_row,            // every weight of `row` is zero
    index_out_of_range,  // ancestors[row, index] is outside [0, n)
    bad_size,            // a size argument is negative or inconsistent
    outside_unit_interval,  // a probability outside [0, 1] at (row, index)
    input_changed,       // an index checked valid was out of range when used at (row, index): another
                         // thread wrote to the arguments during the call (outputs may be partly written)
};

struct Status {
    StatusCode code = StatusCode::ok;
    std::int64_t row = -1;
    std::int64_t index = -1;
    bool ok() const { return code == StatusCode::ok; }
};

enum class Scheme : int { multinomial = 0, stratified = 1, systematic = 2, residual = 3 };

// normalised[r, i] = logw[r, i] - logsumexp(logw[r, :]);
// log_mean_w[r] = logsumexp(logw[r, :]) - log(n);  ess[r] = 1 / sum_i w_ri^2 with w normalised.
// A row of zero weights is an error unless allow_zero_rows, which reports it as normalised = -inf,
// log_mean_w = -inf, ess = 0. With normalised == nullptr only log_mean_w and ess are computed.
template <typename T>
Status log_normalize(const T* logw, std::int64_t rows, std::int64_t n, bool allow_zero_rows, T* normalised,
                     double* log_mean_w, double* ess);

// Draws m ancestors per row (ascending within the row) into ancestors[rows * m]; unbiased:
// E[#children of i] = m w_i. Row r uses the Philox stream (key, r).
template <typename T>
Status resample(const T* logw, std::int64_t rows, std::int64_t n, Scheme scheme, std::int64_t m,
                std::uint64_t key, std::int64_t* ancestors);

// Per-row settings of a batch whose rows belong to independent runs (requests batched together), each run
// with its own generator, resampling scheme and ESS threshold: row r draws from the stream
// (keys[r], counters[r]) instead of (key, r) and resamples with schemes[r] (a Scheme's code) and
// thresholds[r] instead of the call's. Any pointer may be null: the call's own value for every row.
struct RowSettings {
    const std::uint64_t* keys = nullptr;
    const std::uint64_t* counters = nullptr;
    const double* thresholds = nullptr;
    const std::uint8_t* schemes = nullptr;
};

// One SMC bookkeeping step for every row, in one pass over the weights: log_mean_w and ess as in
// log_normalize; rows with ess < threshold * n (every row when threshold >= 1) are resampled: n
// ancestors drawn with `scheme` from the row's stream (key, row), resampled[r] = 1, unique[r] = the
// number of distinct ancestors, and the row's log-weights reset to 0 in place. Other rows get the
// identity. A row of zero weights is reported (log_mean_w = -inf, ess = 0) and never resampled. With
// survivors_stay, a resampled row's ancestors are arranged as keep_survivors does (the same offspring
// counts, every survivor in its own slot) instead of ascending. Every row is checked before any row's
// log-weights are reset: on error log_w is left as it was (the other outputs are then meaningless). With
// per_row, each row's stream, scheme and threshold are its own (RowSettings); a scheme code that is not one
// when it is read reports input_changed at that row.
template <typename T>
Status smc_step(T* log_w, std::int64_t rows, std::int64_t n, double threshold, Scheme scheme, std::uint64_t key,
                bool survivors_stay, std::int64_t* ancestors, std::uint8_t* resampled, double* log_mean_w,
                double* ess, std::int64_t* unique, const RowSettings& per_row = {});

// One step of SMC with the ratio potentials G = Vh_t / Vh_{t-1} (log_w: rows x n, float64): for every live
// particle k, log_w[k] += log_v[k] - log_v_prev[k] (-inf where log_v_prev[k] = -inf: the weight is zero
// already) and log_v_prev[k] = log_v[k]; then smc_step with survivors_stay; then per row the log-Z
// bookkeeping with log_total = logsumexp of the row's log_w before the step and log_n = log(n) as the caller
// computes it: log_z_increment = (log_mean_w + log_n) - log_total (-inf where log_total = -inf), log_z +=
// it, log_total = log_n on resampled rows and log_mean_w + log_n elsewhere, collapsed = 1 where ess = 0.
// With increment_se (may be null), each row's increment l = log sum_i W_i G_i also gets its standard error
// (delta method) sqrt(sum_i (W_i G_i / e^l - W_i)^2), W_i the normalised weights before the step: inf where l is
// -inf, 0 in a row without live particles (no potential applied).
// NaN or +inf in log_w, or in log_v / log_v_prev of a live particle, or an updated log-weight that would be NaN or
// +inf (log_v - log_v_prev overflowing), is reported before anything is written. per_row: as in smc_step
// (the rows of several runs with the same n, each as its own call would step it).
Status smc_reweight(double* log_w, std::int64_t rows, std::int64_t n, const double* log_v, double* log_v_prev,
                    const std::uint8_t* live, double log_n, double threshold, Scheme scheme, std::uint64_t key,
                    double* log_total, double* log_z, std::uint8_t* collapsed, std::int64_t* ancestors,
                    std::uint8_t* resampled, double* ess, std::int64_t* unique, double* log_z_increment,
                    double* increment_se = nullptr, const RowSettings& per_row = {});

// One index per row drawn with probability w_i, and the row's log mean weight. Row r draws from the stream
// (key, r), or with keys and counters (rows of independent runs batched together) from (keys[r], counters[r]).
template <typename T>
Status pool_select(const T* logw, std::int64_t rows, std::int64_t n, std::uint64_t key, std::int64_t* index,
                   double* log_mean_w, const std::uint64_t* keys = nullptr, const std::uint64_t* counters = nullptr);

// Token draws from logits: per row r, the scores s = double(logits[r]) / temperature (no division at
// temperature 1) and the draw of pool_select on them (same stream, same index), with its log-probability
// log_prob[r] = log p(v) = s_v - log sum_u exp(s_u), computed as (s_v - max s) - log sum_u exp(s_u - max s):
// never positive, and as -log1p(the other terms' sum) where v is a maximum of probability over 1/2 (no
// digits lost to 1 + a small sum). Where finite logits give scores of +inf, or only -inf (temperature < 1),
// the scores are (logits - max logits) / temperature instead: the same law, and no error for finite
// logits. Needs temperature > 0. Rows with active[r] == 0 (active == nullptr: none) are skipped: index 0,
// log_prob 0, their logits never read. Row r draws from the stream (key, r), or with keys and counters (rows
// of independent runs batched together, each keyed from its own generator) from (keys[r], counters[r]).
template <typename T>
Status sample_logits(const T* logits, std::int64_t rows, std::int64_t n, double temperature, std::uint64_t key,
                     const std::uint8_t* active, std::int64_t* index, double* log_prob,
                     const std::uint64_t* keys = nullptr, const std::uint64_t* counters = nullptr);

// accept[r] = u_r < exp(log_z_proposed[r] - log_z_current[r]); a current -inf is always left, otherwise
// a proposed -inf is always rejected. NaN and +inf are errors (index = which argument: 0 current, 1 proposed).
Status mh_accept(const double* log_z_current, const double* log_z_proposed, std::int64_t rows,
                 std::uint64_t key, std::uint8_t* accept);

// out[r, j, :] = x[r, ancestors[r, j], :] for rows of n items of item_bytes bytes and m ancestors per row.
// out == x reorders in place (needs m == n) and copies only items whose ancestor is not themselves;
// otherwise out must not overlap x. out must never overlap the ancestors. Every ancestor is checked before
// anything is written, and again where it is used (input_changed if another thread changed it).
Status gather(const std::uint8_t* x, std::int64_t rows, std::int64_t n, std::int64_t item_bytes,
              const std::int64_t* ancestors, std::int64_t m, std::uint8_t* out);

// What an in-place reorder copies of an array's items: all of each (blocks == 0), or, for items laid out as
// `blocks` blocks of `width` columns of `column_bytes` bytes each (a row of a right-padded KV cache:
// heads x capacity x head_dim) of which only the first columns are ever read, the first used[i] columns of
// every block of the ancestor i (its columns after are left as they were).
struct ItemPrefix {
    std::int64_t blocks = 0;
    std::int64_t width = 0;
    std::int64_t column_bytes = 0;
};

// gather(arrays[k], rows, n, item_bytes[k], ancestors, n, arrays[k]) for k < count: several arrays reordered
// in place by the same ancestors. The ancestors are checked once, before anything is written. With
// `prefixes` (one per array, blocks x width x column_bytes == item_bytes[k] where blocks > 0) and `used`
// (rows x n, each item's columns read, clamped to [0, width] where used), an array with a prefix copies
// only the columns its ancestors use.
Status reorder_in_place(std::uint8_t* const* arrays, const std::int64_t* item_bytes, std::int64_t count,
                        std::int64_t rows, std::int64_t n, const std::int64_t* ancestors,
                        const ItemPrefix* prefixes = nullptr, const std::int64_t* used = nullptr);

// Rearranges each row of ancestors (values in [0, n)) so that every particle with children keeps its own
// slot and its extra copies fill the childless slots in ascending order of slot and of parent: the
// offspring counts are unchanged, and an in-place gather by the result moves only the childless slots.
// Every ancestor is checked before anything is written.
Status keep_survivors(std::int64_t* ancestors, std::int64_t rows, std::int64_t n);

// One part of concatenate_padded: `rows` rows (C-contiguous), each `blocks` segments of `length` items,
// of which `skip` are left out: the first ones (left padding) or the last ones (right padding).
struct PaddedPart {
    const std::uint8_t* data;
    std::int64_t rows;
    std::int64_t length;
    std::int64_t skip;
};

// Joins batches along their first axis, padding one inner axis (a KV cache's sequence axis) to a common
// width: out is (sum of rows, blocks, width) items of item_bytes bytes, part k filling the rows after
// those of parts 0..k-1. Left padding (pad_end false): each segment's kept items (skip .. length - 1) end
// at the last column of the segment in out, and the columns before them are zero. Right padding (pad_end
// true): its kept items (0 .. length - skip - 1) start the segment, and the columns after them are zero.
// Needs 0 <= skip <= length and length - skip <= width for every part (checked before anything is
// written); out must not overlap a part. With `used` (right padding only: one count per row of out, each at
// least 0), row r's segments take only their first min(used[r], kept) items and the columns after are left as
// they were (a KV cache written in place, of which no column past a row's length is read): a row that has
// used half the cache's width copies half its bytes. `used` is read once per row.
Status concatenate_padded(const PaddedPart* parts, std::int64_t count, std::int64_t blocks, std::int64_t width,
                          std::int64_t item_bytes, std::uint8_t* out, bool pad_end = false,
                          const std::int64_t* used = nullptr);

// -- token sequences (the ONNX models' per-step bookkeeping) --------------------------------------------

// Appends new_tokens[r] to every row r with active[r]: tokens[r, lengths[r]] = new_tokens[r] (rows of
// `capacity` tokens), lengths[r] += 1, and finished[r] = 1 once the row is max_length long or the token is
// one of stop_ids. still[r] = active[r] and not finished[r] afterwards; num_still counts them. Every
// active row must have 0 <= lengths[r] < min(capacity, max_length): checked before anything is written
// (index_out_of_range at (row, its length) otherwise).
Status append_tokens(std::int64_t* tokens, std::int64_t rows, std::int64_t capacity, std::int64_t* lengths,
                     std::uint8_t* finished, const std::int64_t* new_tokens, const std::uint8_t* active,
                     const std::int64_t* stop_ids, std::int64_t num_stop, std::int64_t max_length,
                     std::uint8_t* still, std::int64_t* num_still);

// The inputs of one cached decoding step of a left-padded batch whose attention mask so far is
// mask (rows, width): input_ids[r] = new_tokens[r] where still[r], else pad (then masked);
// next_mask (rows, width + 1) = the row's mask followed by still[r]; positions[r] = the number of ones
// in mask[r] (the new token's position: left padding and masked steps never shift positions).
void decode_inputs(const std::int64_t* mask, std::int64_t rows, std::int64_t width, const std::uint8_t* still,
                   const std::int64_t* new_tokens, std::int64_t pad, std::int64_t* input_ids,
                   std::int64_t* next_mask, std::int64_t* positions);

// The same step of a right-padded batch (attention that reads each row's length from its mask): with
// length[r] the number of nonzero entries of mask[r], feed_mask (rows, width + 1), the session's, is one
// on the row's first length[r] + 1 columns (the graph writes the row's next column whether or not it is
// fed); next_mask, the mask kept, on its first length[r] + still[r]; positions[r] = length[r].
void decode_inputs_right_padded(const std::int64_t* mask, std::int64_t rows, std::int64_t width,
                                const std::uint8_t* still, const std::int64_t* new_tokens, std::int64_t pad,
                                std::int64_t* input_ids, std::int64_t* feed_mask, std::int64_t* next_mask,
                                std::int64_t* positions);

// Prefix batches for scoring models. Particle p = b * n + i (b < batch prompts, n particles each) is prompt
// b's tokens prompt_ids[prompt_offsets[b] : prompt_offsets[b + 1]] followed by its generated tokens
// tokens[p, :lengths[p]] (rows of `capacity`). Row r of a batch is particle selected[r] (selected == nullptr:
// particle r, num_rows = batch * n). prefix_width checks the offsets (ascending from 0), the selection and
// the lengths (0 <= lengths[p] <= capacity) and gives the longest row's length.
Status prefix_width(const std::int64_t* prompt_offsets, std::int64_t batch, std::int64_t n, std::int64_t capacity,
                    const std::int64_t* lengths, const std::int64_t* selected, std::int64_t num_rows,
                    std::int64_t* width);

// The rows right-padded with `pad` to `width` (>= prefix_width's) columns: ids (num_rows, width), mask 1 on
// a row's tokens and 0 on its padding, last[r] = its length - 1, and (positions != nullptr) the position
// ids 0, 1, ..., length - 1, then length - 1 repeated over the padding. Unchecked: call prefix_width first, on
// offsets, lengths and selection no other thread writes (the binding passes copies of them to both).
void right_padded_prefixes(const std::int64_t* prompt_ids, const std::int64_t* prompt_offsets, std::int64_t n,
                           const std::int64_t* tokens, std::int64_t capacity, const std::int64_t* lengths,
                           const std::int64_t* selected, std::int64_t num_rows, std::int64_t width, std::int64_t pad,
                           std::int64_t* ids, std::int64_t* mask, std::int64_t* last, std::int64_t* positions);

// How a scoring model's output reads as a log-value: the log-value itself, a probability, or a logit.
enum class ScoreKind : int { log_value = 0, prob = 1, logit = 2 };

// log_values[r] from the score scores[r, columns[r]] of rows of `width` scores (columns == nullptr: the last
// column): the score itself (log_value), log(score) (prob: score in [0, 1], else outside_unit_interval), or
// log sigmoid(score) = -log(1 + exp(-score)) (logit, evaluated as numpy's logaddexp). NaN is nan_weight at
// (row, column), a log_value of +inf positive_infinity: every result is finite or -inf. Everything is
// checked before log_values is written.
template <typename T>
Status read_log_values(const T* scores, std::int64_t rows, std::int64_t width, const std::int64_t* columns,
                       ScoreKind kind, double* log_values);

// Threads that large calls may use (0: the hardware's count); results never depend on it.
void set_num_threads(int num_threads);
int get_num_threads();

}  // namespace tiltsmc
