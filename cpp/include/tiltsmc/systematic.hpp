// Systematic resampling of one row from its weights, exposed for the core's unit tests (which hand it
// chunk offsets that disagree with the weights' own sums, as rounding can make them).
#pragma once

#include <cstdint>

#include "tiltsmc/row_weights.hpp"

namespace tiltsmc::detail {

// m ancestors of the row whose weights w = exp(x - shift) (overwritten) and figures rw are given:
// the points (j + u) / m * rw.sum, j in [0, m), each take the first particle whose cumulative weight
// exceeds it; a particle of weight zero is never taken. With split, chunks run on the thread pool.
void systematic_row(double* w, std::int64_t n, const RowWeights& rw, std::int64_t m, double u,
                    std::int64_t* out, bool split);

}  // namespace tiltsmc::detail
