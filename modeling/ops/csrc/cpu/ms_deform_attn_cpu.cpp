// CPU kernels of multi-scale deformable attention.
//
// Forward: parallel over (batch, query); for each head the head_dim channels are accumulated in a small array
// that the compiler keeps in vector registers (head_dim is a template constant for the common sizes).
// Backward: parallel over (batch, head, level) tasks. Each task owns grad_value[b, level rows, head, :] and the
// location/weight gradients of its (head, level), and walks the queries in order, so there are no atomics and the
// result is bitwise identical for any thread count.
// No -march flags: the hot loops are compiled per instruction set with `target_clones` and the loader picks the
// clone for the running CPU (AVX-512, AVX2+FMA, or baseline x86-64).
#include "cpu/ms_deform_attn_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MSDA_NO_MULTIVERSIONING)
#define MSDA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MSDA_HAVE_CLONES 1
#else
#define MSDA_CPU_CLONES
#define MSDA_HAVE_CLONES 0
#endif

#if defined(__GNUC__) || defined(__clang__)
// Inlined into each instruction-set clone, so the body is compiled for that clone's vector width.
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSDA_ALWAYS_INLINE inline
#endif

namespace mask2former {
namespace msda {

const char* cpu_kernel_isa() {
#if MSDA_HAVE_CLONES
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "default";
}

namespace {

struct Problem {
  int64_t batch;
  int64_t num_values;   // S
  int64_t num_heads;    // h
  int64_t head_dim;     // D
  int64_t num_queries;  // Q
  int64_t num_levels;   // L
  int64_t num_points;   // P
  // Element strides of value (and of the grad_value buffer) along batch, position and head; channels are contiguous.
  int64_t value_batch_stride;
  int64_t value_row_stride;
  int64_t value_head_stride;
  // Strides of sampling_locations / attention_weights along batch, query and head, counted in samples (one
  // sample = one (level, point); its location is 2 elements). The L*P samples of one (b, q, head) are contiguous.
  int64_t sample_batch_stride;
  int64_t sample_query_stride;
  int64_t sample_head_stride;
  const int64_t* spatial_shapes;  // (L, 2) as (H, W)
  const int64_t* level_start;     // (L,) first row of each level
};

template <typename scalar_t>
struct AccType {
  using type = scalar_t;
};

// Queries per forward work item (see forward_rows).
constexpr int64_t kQueryBlock = 32;
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_HAVE_VECTOR_EXTENSIONS 1
// Channel vectors of 32 bytes through the GCC/Clang vector extensions: each target_clones clone compiles them to
// its own instructions (one AVX register on AVX2/AVX-512, two SSE registers on baseline x86-64, NEON elsewhere).
template <typename scalar_t>
struct ChannelVector;

template <>
struct ChannelVector<float> {
  using acc_t = float;
  typedef float vec_t __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
  static MSDA_ALWAYS_INLINE vec_t load(const float* row) {
    vec_t result;
    std::memcpy(&result, row, sizeof(result));
    return result;
  }
  static MSDA_ALWAYS_INLINE void store(float* row, vec_t vector) { std::memcpy(row, &vector, sizeof(vector)); }
};

template <>
struct ChannelVector<double> {
  using acc_t = double;
  typedef double vec_t __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
  static MSDA_ALWAYS_INLINE vec_t load(const double* row) {
    vec_t result;
    std::memcpy(&result, row, sizeof(result));
    return result;
  }
  static MSDA_ALWAYS_INLINE void store(double* row, vec_t vector) { std::memcpy(row, &vector, sizeof(vector)); }
};

template <>
struct ChannelVector<c10::BFloat16> {
  using acc_t = float;
  typedef float vec_t __attribute__((vector_size(32)));
  typedef uint16_t half_bits_t __attribute__((vector_size(16)));
  typedef uint32_t bits_t __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
  // bf16 is the top half of an fp32: widen the bits and shift them up.
  static MSDA_ALWAYS_INLINE vec_t load(const c10::BFloat16* row) {
    half_bits_t half_bits;
    std::memcpy(&half_bits, row, sizeof(half_bits));
    const bits_t bits = __builtin_convertvector(half_bits, bits_t) << 16;
    vec_t result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
  }
  static MSDA_ALWAYS_INLINE void store(c10::BFloat16* row, vec_t vector) {
    for (int lane = 0; lane < kLanes; ++lane) row[lane] = c10::BFloat16(vector[lane]);  // round to nearest even
  }
};

template <typename vec_t, int kLanes>
MSDA_ALWAYS_INLINE auto horizontal_sum(vec_t vector) -> decltype(vector[0] + vector[0]) {
  decltype(vector[0] + vector[0]) sum = 0;
  for (int lane = 0; lane < kLanes; ++lane) sum += vector[lane];  // fixed order: deterministic
  return sum;
}
#else
#define MSDA_HAVE_VECTOR_EXTENSIONS 0
#endif

// Query blocks [begin, end) of the flattened (batch, query block) axis. Inside a block the heads are the outer
// loop: the block's locations and weights (kQueryBlock x h x L x P) and one head's neighbourhood of value rows both
// stay in L2, where a query-outer order would sweep all heads' rows and a head-outer order over all queries would
// stream the locations once per head.
// Two phases per (query, head): every corner's row pointer and weight (attention x bilinear weight) first, then one
// branch-free multiply-add sweep over the corners; corners outside the map point at a zero row with weight 0.
// kHeadDim > 0: head_dim is that compile-time multiple of the vector width; 0: any head_dim, scalar loops.
template <typename scalar_t, int kHeadDim>
MSDA_ALWAYS_INLINE void forward_rows(const Problem& problem, const scalar_t* value, const scalar_t* sampling_locations,
                                     const scalar_t* attention_weights, scalar_t* output, int64_t begin, int64_t end) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : problem.head_dim;
  const int64_t row_stride = problem.value_row_stride;  // elements between value rows s and s + 1
  const int64_t output_row_stride = problem.num_heads * head_dim;
  const int64_t samples_per_head = problem.num_levels * problem.num_points;
  const std::vector<scalar_t> zero_row(head_dim, scalar_t(0));
  const int64_t num_corners = 4 * samples_per_head;
  std::vector<const scalar_t*> corner_rows(num_corners);
  std::vector<acc_t> corner_weights(num_corners);
  std::vector<acc_t> scalar_accumulator(kHeadDim > 0 ? 0 : head_dim);

  const int64_t num_blocks = (problem.num_queries + kQueryBlock - 1) / kQueryBlock;
  for (int64_t block_item = begin; block_item < end; ++block_item) {
    const int64_t batch_index = block_item / (problem.num_heads * num_blocks);
    const int64_t head = (block_item / num_blocks) % problem.num_heads;
    const int64_t first_query = (block_item % num_blocks) * kQueryBlock;
    const int64_t last_query = std::min(first_query + kQueryBlock, problem.num_queries);
    for (int64_t query = first_query; query < last_query; ++query) {
    const int64_t batch_query = batch_index * problem.num_queries + query;
    const scalar_t* batch_value = value + batch_index * problem.value_batch_stride;
    const int64_t first_sample = batch_index * problem.sample_batch_stride + query * problem.sample_query_stride +
                                 head * problem.sample_head_stride;
    int64_t corner_index = 0;
    for (int64_t level = 0; level < problem.num_levels; ++level) {
      const int64_t height = problem.spatial_shapes[2 * level];
      const int64_t width = problem.spatial_shapes[2 * level + 1];
      const scalar_t* level_value =
          batch_value + problem.level_start[level] * row_stride + head * problem.value_head_stride;
      for (int64_t point = 0; point < problem.num_points; ++point) {
        const int64_t sample_index = first_sample + level * problem.num_points + point;
        const acc_t location_x = static_cast<acc_t>(sampling_locations[2 * sample_index]);
        const acc_t location_y = static_cast<acc_t>(sampling_locations[2 * sample_index + 1]);
        const acc_t attention = static_cast<acc_t>(attention_weights[sample_index]);
        int64_t top_left;
        acc_t interior_weight[4];
        if (bilinear_sample_interior<acc_t>(location_x, location_y, height, width, top_left, interior_weight)) {
          const scalar_t* top_left_row = level_value + top_left * row_stride;
          corner_rows[corner_index] = top_left_row;
          corner_rows[corner_index + 1] = top_left_row + row_stride;
          corner_rows[corner_index + 2] = top_left_row + width * row_stride;
          corner_rows[corner_index + 3] = top_left_row + (width + 1) * row_stride;
          for (int corner = 0; corner < 4; ++corner) {
            corner_weights[corner_index + corner] = attention * interior_weight[corner];
          }
          corner_index += 4;
          continue;
        }
        BilinearSample<acc_t> sample;
        const bool inside = bilinear_sample<acc_t>(location_x, location_y, height, width, sample);
        for (int corner = 0; corner < 4; ++corner, ++corner_index) {
          const bool valid = inside && sample.valid[corner];
          corner_rows[corner_index] = valid ? level_value + sample.offset[corner] * row_stride : zero_row.data();
          corner_weights[corner_index] = valid ? attention * sample.weight[corner] : acc_t(0);
        }
      }
    }
    scalar_t* output_row = output + batch_query * output_row_stride + head * head_dim;
#if MSDA_HAVE_VECTOR_EXTENSIONS
    if constexpr (kHeadDim > 0) {
      using Vector = ChannelVector<scalar_t>;
      using vec_t = typename Vector::vec_t;
      constexpr int kVectors = kHeadDim / Vector::kLanes;
      // Two accumulator sets (upper and lower corner pair) halve the chain of dependent multiply-adds, which
      // otherwise bounds the sweep by the FMA latency. num_corners is a multiple of 4.
      vec_t upper[kVectors], lower[kVectors];
      for (int block = 0; block < kVectors; ++block) upper[block] = lower[block] = vec_t{};
      for (int64_t corner = 0; corner < num_corners; corner += 4) {
        const vec_t weight0 = vec_t{} + corner_weights[corner];
        const vec_t weight1 = vec_t{} + corner_weights[corner + 1];
        const vec_t weight2 = vec_t{} + corner_weights[corner + 2];
        const vec_t weight3 = vec_t{} + corner_weights[corner + 3];
        const scalar_t* row0 = corner_rows[corner];
        const scalar_t* row1 = corner_rows[corner + 1];
        const scalar_t* row2 = corner_rows[corner + 2];
        const scalar_t* row3 = corner_rows[corner + 3];
        MSDA_UNROLL
        for (int block = 0; block < kVectors; ++block) {
          const int lane = block * Vector::kLanes;
          upper[block] += weight0 * Vector::load(row0 + lane) + weight1 * Vector::load(row1 + lane);
          lower[block] += weight2 * Vector::load(row2 + lane) + weight3 * Vector::load(row3 + lane);
        }
      }
      for (int block = 0; block < kVectors; ++block) {
        Vector::store(output_row + block * Vector::kLanes, upper[block] + lower[block]);
      }
      continue;
    }
#endif
    acc_t* accumulator = scalar_accumulator.data();
    for (int64_t channel = 0; channel < head_dim; ++channel) accumulator[channel] = acc_t(0);
    for (int64_t corner = 0; corner < num_corners; ++corner) {
      const acc_t corner_weight = corner_weights[corner];
      const scalar_t* corner_value = corner_rows[corner];
#pragma omp simd
      for (int64_t channel = 0; channel < head_dim; ++channel) {
        accumulator[channel] += corner_weight * static_cast<acc_t>(corner_value[channel]);
      }
    }
    for (int64_t channel = 0; channel < head_dim; ++channel) output_row[channel] = scalar_t(accumulator[channel]);
    }
  }
}

// One (batch, head, level) task of the backward pass; grad_value is in acc_t (fp32 for bf16 inputs) and has value's
// strides. Per sample: the four <grad_output, corner row> dot products (for the location and weight gradients) and
// the four grad_value row updates, in one sweep over the channels.
template <typename scalar_t, int kHeadDim>
MSDA_ALWAYS_INLINE void backward_task(const Problem& problem, const scalar_t* value,
                                      const scalar_t* sampling_locations, const scalar_t* attention_weights,
                                      const scalar_t* grad_output, typename AccType<scalar_t>::type* grad_value,
                                      scalar_t* grad_sampling_locations, scalar_t* grad_attention_weights,
                                      int64_t task) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : problem.head_dim;
  const int64_t row_stride = problem.value_row_stride;
  const int64_t output_row_stride = problem.num_heads * head_dim;
  const int64_t level = task % problem.num_levels;
  const int64_t head = (task / problem.num_levels) % problem.num_heads;
  const int64_t batch_index = task / (problem.num_levels * problem.num_heads);
  const int64_t height = problem.spatial_shapes[2 * level];
  const int64_t width = problem.spatial_shapes[2 * level + 1];
  const int64_t level_offset = batch_index * problem.value_batch_stride + problem.level_start[level] * row_stride +
                               head * problem.value_head_stride;
  const scalar_t* level_value = value + level_offset;
  acc_t* level_grad_value = grad_value + level_offset;

  // Corners outside the map read a zero row and write a scratch row (with weight 0): no branch in the sweep.
  const std::vector<scalar_t> zero_row(head_dim, scalar_t(0));
  std::vector<acc_t> scratch_row(head_dim, acc_t(0));
  std::vector<acc_t> grad(head_dim);

  for (int64_t query = 0; query < problem.num_queries; ++query) {
    const int64_t batch_query = batch_index * problem.num_queries + query;
    const scalar_t* grad_output_row = grad_output + batch_query * output_row_stride + head * head_dim;
    for (int64_t channel = 0; channel < head_dim; ++channel) grad[channel] = static_cast<acc_t>(grad_output_row[channel]);
    const int64_t first_sample = batch_index * problem.sample_batch_stride + query * problem.sample_query_stride +
                                 head * problem.sample_head_stride + level * problem.num_points;
    for (int64_t point = 0; point < problem.num_points; ++point) {
      const int64_t sample_index = first_sample + point;
      BilinearSample<acc_t> sample;
      // Gradients of samples with no corner inside the map stay at their zero initialisation.
      if (!bilinear_sample<acc_t>(static_cast<acc_t>(sampling_locations[2 * sample_index]),
                                  static_cast<acc_t>(sampling_locations[2 * sample_index + 1]), height, width,
                                  sample)) {
        continue;
      }
      const acc_t attention = static_cast<acc_t>(attention_weights[sample_index]);
      const scalar_t* corner_value[4];
      acc_t* corner_grad[4];
      acc_t corner_weight[4];
      for (int corner = 0; corner < 4; ++corner) {
        const bool inside = sample.valid[corner];
        corner_value[corner] = inside ? level_value + sample.offset[corner] * row_stride : zero_row.data();
        corner_grad[corner] = inside ? level_grad_value + sample.offset[corner] * row_stride : scratch_row.data();
        corner_weight[corner] = attention * sample.weight[corner];
      }
      acc_t corner_dot[4];
      bool done = false;
#if MSDA_HAVE_VECTOR_EXTENSIONS
      if constexpr (kHeadDim > 0) {
        using Vector = ChannelVector<scalar_t>;
        using AccVector = ChannelVector<acc_t>;
        using vec_t = typename Vector::vec_t;
        constexpr int kLanes = Vector::kLanes;
        constexpr int kVectors = kHeadDim / kLanes;
        vec_t dots[4] = {vec_t{}, vec_t{}, vec_t{}, vec_t{}};
        MSDA_UNROLL
        for (int block = 0; block < kVectors; ++block) {
          const vec_t g = AccVector::load(grad.data() + block * kLanes);
          for (int corner = 0; corner < 4; ++corner) {
            dots[corner] += g * Vector::load(corner_value[corner] + block * kLanes);
            acc_t* grad_row = corner_grad[corner] + block * kLanes;
            AccVector::store(grad_row, AccVector::load(grad_row) + corner_weight[corner] * g);
          }
        }
        for (int corner = 0; corner < 4; ++corner) corner_dot[corner] = horizontal_sum<vec_t, kLanes>(dots[corner]);
        done = true;
      }
#endif
      if (!done) {
        const scalar_t* value0 = corner_value[0];
        const scalar_t* value1 = corner_value[1];
        const scalar_t* value2 = corner_value[2];
        const scalar_t* value3 = corner_value[3];
        acc_t* grad0 = corner_grad[0];
        acc_t* grad1 = corner_grad[1];
        acc_t* grad2 = corner_grad[2];
        acc_t* grad3 = corner_grad[3];
        acc_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
        // The simd reduction order depends only on the vector width, never on the thread count.
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
        for (int64_t channel = 0; channel < head_dim; ++channel) {
          const acc_t g = grad[channel];
          dot0 += g * static_cast<acc_t>(value0[channel]);
          dot1 += g * static_cast<acc_t>(value1[channel]);
          dot2 += g * static_cast<acc_t>(value2[channel]);
          dot3 += g * static_cast<acc_t>(value3[channel]);
          grad0[channel] += corner_weight[0] * g;
          grad1[channel] += corner_weight[1] * g;
          grad2[channel] += corner_weight[2] * g;
          grad3[channel] += corner_weight[3] * g;
        }
        corner_dot[0] = dot0;
        corner_dot[1] = dot1;
        corner_dot[2] = dot2;
        corner_dot[3] = dot3;
      }
      acc_t d_sample, d_loc_x, d_loc_y;
      sample_gradient<acc_t>(sample, corner_dot, height, width, d_sample, d_loc_x, d_loc_y);
      grad_attention_weights[sample_index] = scalar_t(d_sample);
      grad_sampling_locations[2 * sample_index] = scalar_t(attention * d_loc_x);
      grad_sampling_locations[2 * sample_index + 1] = scalar_t(attention * d_loc_y);
    }
  }
}

// Head-dim specialisations; anything else runs the runtime-size loop.
#define MSDA_DISPATCH_HEAD_DIM(head_dim, FUNC, ...) \
  switch (head_dim) {                               \
    case 32:                                        \
      FUNC<scalar_t, 32>(__VA_ARGS__);              \
      break;                                        \
    case 64:                                        \
      FUNC<scalar_t, 64>(__VA_ARGS__);              \
      break;                                        \
    case 16:                                        \
      FUNC<scalar_t, 16>(__VA_ARGS__);              \
      break;                                        \
    default:                                        \
      FUNC<scalar_t, 0>(__VA_ARGS__);               \
  }

// One multiversioned entry point per dtype (target_clones needs plain, non-template functions).
#define MSDA_DEFINE_CPU_ENTRY_POINTS(scalar_type, suffix)                                                            \
  MSDA_CPU_CLONES void forward_rows_##suffix(const Problem& problem, const scalar_type* value,                       \
                                             const scalar_type* sampling_locations,                                  \
                                             const scalar_type* attention_weights, scalar_type* output,              \
                                             int64_t begin, int64_t end) {                                           \
    using scalar_t = scalar_type;                                                                                    \
    MSDA_DISPATCH_HEAD_DIM(problem.head_dim, forward_rows, problem, value, sampling_locations, attention_weights,    \
                           output, begin, end)                                                                       \
  }                                                                                                                  \
  MSDA_CPU_CLONES void backward_task_##suffix(                                                                       \
      const Problem& problem, const scalar_type* value, const scalar_type* sampling_locations,                       \
      const scalar_type* attention_weights, const scalar_type* grad_output,                                          \
      typename AccType<scalar_type>::type* grad_value, scalar_type* grad_sampling_locations,                         \
      scalar_type* grad_attention_weights, int64_t task) {                                                           \
    using scalar_t = scalar_type;                                                                                    \
    MSDA_DISPATCH_HEAD_DIM(problem.head_dim, backward_task, problem, value, sampling_locations, attention_weights,   \
                           grad_output, grad_value, grad_sampling_locations, grad_attention_weights, task)           \
  }

MSDA_DEFINE_CPU_ENTRY_POINTS(float, float)
MSDA_DEFINE_CPU_ENTRY_POINTS(double, double)
MSDA_DEFINE_CPU_ENTRY_POINTS(c10::BFloat16, bfloat16)

inline void forward_rows_any(const Problem& p, const float* v, const float* l, const float* a, float* o, int64_t b,
                             int64_t e) {
  forward_rows_float(p, v, l, a, o, b, e);
}
inline void forward_rows_any(const Problem& p, const double* v, const double* l, const double* a, double* o,
                             int64_t b, int64_t e) {
  forward_rows_double(p, v, l, a, o, b, e);
}
inline void forward_rows_any(const Problem& p, const c10::BFloat16* v, const c10::BFloat16* l,
                             const c10::BFloat16* a, c10::BFloat16* o, int64_t b, int64_t e) {
  forward_rows_bfloat16(p, v, l, a, o, b, e);
}
inline void backward_task_any(const Problem& p, const float* v, const float* l, const float* a, const float* g,
                              float* gv, float* gl, float* ga, int64_t t) {
  backward_task_float(p, v, l, a, g, gv, gl, ga, t);
}
inline void backward_task_any(const Problem& p, const double* v, const double* l, const double* a, const double* g,
                              double* gv, double* gl, double* ga, int64_t t) {
  backward_task_double(p, v, l, a, g, gv, gl, ga, t);
}
inline void backward_task_any(const Problem& p, const c10::BFloat16* v, const c10::BFloat16* l,
                              const c10::BFloat16* a, const c10::BFloat16* g, float* gv, c10::BFloat16* gl,
                              c10::BFloat16* ga, int64_t t) {
  backward_task_bfloat16(p, v, l, a, g, gv, gl, ga, t);
}

Problem make_problem(const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& spatial_shapes,
                     std::vector<int64_t>& level_start) {
  Problem problem;
  problem.batch = value.size(0);
  problem.num_values = value.size(1);
  problem.num_heads = value.size(2);
  problem.head_dim = value.size(3);
  problem.num_queries = sampling_locations.size(1);
  problem.num_levels = sampling_locations.size(3);
  problem.num_points = sampling_locations.size(4);
  problem.value_batch_stride = value.stride(0);
  problem.value_row_stride = value.stride(1);
  problem.value_head_stride = value.stride(2);
  const int64_t samples_per_head = problem.num_levels * problem.num_points;
  problem.sample_batch_stride = sampling_locations.stride(0) / 2;
  problem.sample_query_stride = sampling_locations.stride(1) / 2;
  problem.sample_head_stride = sampling_locations.stride(2) / 2;
  (void)samples_per_head;  // the (L, P, 2) block of every (b, q, head) is dense in both layouts the callers pass
  problem.spatial_shapes = spatial_shapes.data_ptr<int64_t>();
  level_start.resize(problem.num_levels);
  level_start_rows(problem.spatial_shapes, problem.num_levels, level_start.data());
  problem.level_start = level_start.data();
  return problem;
}

void check_cpu_dtype(const at::Tensor& value) {
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16,
              "ms_deform_attn (CPU): unsupported dtype ", dtype, " for value of shape ", value.sizes(),
              "; use float32, float64 or bfloat16");
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& sampling_locations_in,
                                      const at::Tensor& attention_weights_in) {
  check_inputs(value_in, spatial_shapes_in, sampling_locations_in, attention_weights_in);
  check_cpu_dtype(value_in);
  // Head-major copies, (B, h, S, D) and (B, h, Q, L, P[, 2]), viewed back in the input shapes: the kernel then
  // sweeps one head's queries over contiguous locations and a compact value window that stays in L2. The copies
  // cost one pass over the inputs and save far more in cache misses.
  const auto value = value_in.transpose(1, 2).contiguous().transpose(1, 2);
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto sampling_locations = sampling_locations_in.transpose(1, 2).contiguous().transpose(1, 2);
  const auto attention_weights = attention_weights_in.transpose(1, 2).contiguous().transpose(1, 2);
  std::vector<int64_t> level_start;
  const Problem problem = make_problem(value, sampling_locations, spatial_shapes, level_start);
  // (B, Q, h * D)
  auto output = at::empty({problem.batch, problem.num_queries, problem.num_heads * problem.head_dim}, value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t* value_data = value.data_ptr<scalar_t>();
    const scalar_t* location_data = sampling_locations.data_ptr<scalar_t>();
    const scalar_t* weight_data = attention_weights.data_ptr<scalar_t>();
    scalar_t* output_data = output.data_ptr<scalar_t>();
    const int64_t num_blocks = (problem.num_queries + kQueryBlock - 1) / kQueryBlock;
    at::parallel_for(0, problem.batch * problem.num_heads * num_blocks, 1, [&](int64_t begin, int64_t end) {
      forward_rows_any(problem, value_data, location_data, weight_data, output_data, begin, end);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& sampling_locations_in,
    const at::Tensor& attention_weights_in, const at::Tensor& grad_output_in) {
  check_inputs(value_in, spatial_shapes_in, sampling_locations_in, attention_weights_in, &grad_output_in);
  check_cpu_dtype(value_in);
  // Head-major copies as in the forward: each (batch, head, level) task reads its locations contiguously.
  const auto value = value_in.transpose(1, 2).contiguous().transpose(1, 2);
  const auto spatial_shapes = spatial_shapes_in.contiguous();
  const auto sampling_locations = sampling_locations_in.transpose(1, 2).contiguous().transpose(1, 2);
  const auto attention_weights = attention_weights_in.transpose(1, 2).contiguous().transpose(1, 2);
  const auto grad_output = grad_output_in.contiguous();
  std::vector<int64_t> level_start;
  const Problem problem = make_problem(value, sampling_locations, spatial_shapes, level_start);
  const bool reduced_precision = value.scalar_type() == at::kBFloat16;
  // bf16 gradients of value are summed over many queries: accumulate them in fp32.
  // The gradient buffers have the head-major layouts of their inputs: the kernel indexes them with the same strides.
  auto head_major_zeros = [](const at::Tensor& like, at::ScalarType dtype) {
    return at::zeros_like(like, like.options().dtype(dtype), at::MemoryFormat::Preserve);
  };
  auto grad_value_acc = head_major_zeros(value, reduced_precision ? at::kFloat : value.scalar_type());
  auto grad_sampling_locations = head_major_zeros(sampling_locations, sampling_locations.scalar_type());
  auto grad_attention_weights = head_major_zeros(attention_weights, attention_weights.scalar_type());
  TORCH_INTERNAL_ASSERT(grad_value_acc.strides() == value.strides() &&
                        grad_sampling_locations.strides() == sampling_locations.strides() &&
                        grad_attention_weights.strides() == attention_weights.strides());
  const int64_t num_tasks = problem.batch * problem.num_heads * problem.num_levels;
  if (value.numel() > 0 && attention_weights.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      const scalar_t* value_data = value.data_ptr<scalar_t>();
      const scalar_t* location_data = sampling_locations.data_ptr<scalar_t>();
      const scalar_t* weight_data = attention_weights.data_ptr<scalar_t>();
      const scalar_t* grad_output_data = grad_output.data_ptr<scalar_t>();
      acc_t* grad_value_data = grad_value_acc.data_ptr<acc_t>();
      scalar_t* grad_location_data = grad_sampling_locations.data_ptr<scalar_t>();
      scalar_t* grad_weight_data = grad_attention_weights.data_ptr<scalar_t>();
      at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          backward_task_any(problem, value_data, location_data, weight_data, grad_output_data, grad_value_data,
                            grad_location_data, grad_weight_data, task);
        }
      });
    });
  }
  // Back to the (B, S, h, D) layout (and dtype) of the input, as the fake kernel promises.
  auto grad_value = grad_value_acc.contiguous().to(value.scalar_type());
  return {grad_value, grad_sampling_locations.contiguous(), grad_attention_weights.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(mask2former, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace msda
}  // namespace mask2former
