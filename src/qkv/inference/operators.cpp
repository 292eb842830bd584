// qkv's own operators for decoding on the CPU (qkv/inference/native.py builds this file on the
// machine that runs it, and says why each exists):
//
// qkv::beam_self_attention: a decoder layer's self-attention over BeamCache's layout, each beam
// reading only the slots of its own history. BeamCache keeps the keys and values of all of a
// sentence's beams side by side, one slot per beam and position, and an additive mask (0 in a
// beam's history, -inf elsewhere) keeps each beam to its own. Inductor's kernel for that formula
// reads every slot for every beam, five times the slots a beam of five needs; this one lists a
// beam's slots from the mask and reads those only.
//
// qkv::log_softmax_: log-probabilities over the logits, in place: a pass for the maximum, one for
// the sum of exponentials (ATen's vectorised exp_u20, faster than the exp of torch.log_softmax), one
// that writes.
//
// qkv::pack_linear and qkv::packed_linear: x W^T + b (then a ReLU) for the few rows of a decoding
// step, over weights packed once into panels of 16 output features (two AVX2 vectors), each panel's
// columns side by side for every input feature and then their biases, so that a register block of up
// to 6 rows x 16 features reads its weights in order; one row (greedy on one sentence) by a loop of
// its own that keeps four sums going. oneDNN sets up each call for a general product; at 8-160 rows,
// the setup and its blocking cost more than the arithmetic of a small weight.
//
// qkv::row_topk: the k largest values of each row and their indices, largest first, as
// torch.topk(x, k, dim=1) gives them (of equal values, the first in the row first), for a beam
// search's candidates in a compiled step: one pass over each row, a vector of values at a time
// against the k-th largest so far. torch.topk, called from a program, sorts more than a few rows of
// thousands need.
//
// qkv::log_softmax_topk: log_softmax_ with a bias added, then row_topk, one row at a time while it
// is in the first cache: a beam step's log-probabilities and candidates in one call.
//
// qkv::biased_argmax: each row's argmax of logits + bias, as torch.argmax gives it, in two vector
// passes a row: a greedy step's best tokens.
//
// qkv::pack_screen and qkv::screened_best: a greedy step's next token at one row from an int8 copy
// of the output weights (a quarter of the bytes), each logit within a bound of its fp32 value, and
// the exact logits of the few tokens the bounds leave, from the one-row loop over their panels.
// qkv::screened_best_rows: the same for many rows, the screen qkv's int8 product (rowwise_int8.cpp).
//
// qkv::pack_int8_linear and qkv::packed_int8_linear: in rowwise_int8.cpp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

// From rowwise_int8.cpp (one library): qkv::packed_int8_linear, and whether it takes VNNI's
// instructions (then each row is quantised to 0..255, else 0..127).
namespace qkv_native {
at::Tensor rowwise_int8_product(const at::Tensor& x, const at::Tensor& weights,
                                const at::Tensor& params, int64_t out_features, int64_t relu);
}
extern "C" int qkv_int8_takes_vnni();

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();
constexpr float kEpsilon = std::numeric_limits<float>::epsilon();

inline float sum_of(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// One query's dot products with four keys: four independent sums, so that each product does not
// wait for the one before it.
inline void dot4(const float* q, const float* const* k, int64_t n, float* out) {
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) {
    const Vec x = Vec::loadu(q + d);
    a0 = at::vec::fmadd(x, Vec::loadu(k[0] + d), a0);
    a1 = at::vec::fmadd(x, Vec::loadu(k[1] + d), a1);
    a2 = at::vec::fmadd(x, Vec::loadu(k[2] + d), a2);
    a3 = at::vec::fmadd(x, Vec::loadu(k[3] + d), a3);
  }
  out[0] = sum_of(a0);
  out[1] = sum_of(a1);
  out[2] = sum_of(a2);
  out[3] = sum_of(a3);
  for (; d < n; ++d) {
    out[0] += q[d] * k[0][d];
    out[1] += q[d] * k[1][d];
    out[2] += q[d] * k[2][d];
    out[3] += q[d] * k[3][d];
  }
}

inline float dot(const float* q, const float* k, int64_t n) {
  Vec sum(0.f);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size())
    sum = at::vec::fmadd(Vec::loadu(q + d), Vec::loadu(k + d), sum);
  float out = sum_of(sum);
  for (; d < n; ++d) out += q[d] * k[d];
  return out;
}

// projected (rows = sentences x beams, 1, 3 x d_model): each beam's query, key and value of the
// open position (heads side by side in each). keys, values (sentences, heads, capacity, d_head): the
// cache's buffers, of which the first bias.size(3) slots are written. bias (sentences, 1, beams,
// written): 0 in each beam's history, -inf elsewhere.
// -> (rows, 1, d_model): softmax(q K^T / sqrt(d_head) + bias) V over the beam's history and its own
// new key and value, heads side by side.
at::Tensor beam_self_attention(const at::Tensor& projected, const at::Tensor& keys,
                               const at::Tensor& values, const at::Tensor& bias) {
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes(),
              "keys and values: (sentences, heads, capacity, d_head) each");
  TORCH_CHECK(bias.dim() == 4 && bias.size(0) == keys.size(0) && bias.size(1) == 1 &&
                  bias.size(3) <= keys.size(2),
              "bias: (sentences, 1, beams, written), written at most the keys' capacity");
  const int64_t sentences = keys.size(0), heads = keys.size(1), d_head = keys.size(3);
  const int64_t beams = bias.size(2), written = bias.size(3), d_model = heads * d_head;
  TORCH_CHECK(projected.dim() == 3 && projected.size(0) == sentences * beams &&
                  projected.size(1) == 1 && projected.size(2) == 3 * d_model,
              "projected: (sentences x beams, 1, 3 x d_model)");
  for (const at::Tensor* t : {&projected, &keys, &values, &bias}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "float32 CPU tensors");
    TORCH_CHECK(t->stride(-1) == 1, "the last dimension of each tensor contiguous");
  }
  auto out = at::empty({sentences * beams, 1, d_model}, projected.options());
  const float* P = projected.const_data_ptr<float>();
  const float* K = keys.const_data_ptr<float>();
  const float* V = values.const_data_ptr<float>();
  const float* B = bias.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t p_row = projected.stride(0);
  const int64_t b_sentence = bias.stride(0), b_beam = bias.stride(2);
  const int64_t kv_sentence = keys.stride(0), kv_head = keys.stride(1), kv_slot = keys.stride(2);
  const int64_t v_sentence = values.stride(0), v_head = values.stride(1), v_slot = values.stride(2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d_head));

  at::parallel_for(0, sentences * heads, 1, [&](int64_t begin, int64_t end) {
    // Each beam's slots, listed from its mask once per sentence (its heads share them).
    std::vector<int64_t> slots(beams * written), counts(beams);
    int64_t listed = -1;  // the sentence whose slots are listed
    std::vector<float> weights(written + 1);  // the last: the open position's own slot
    std::vector<const float*> key_of(written + 4), value_of(written);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / heads, h = task % heads;
      if (s != listed) {
        for (int64_t beam = 0; beam < beams; ++beam) {
          const float* bias_row = B + s * b_sentence + beam * b_beam;
          int64_t* listing = &slots[beam * written];
          int64_t n = 0;
          for (int64_t j = 0; j < written; ++j)
            if (bias_row[j] != kMinusInf) listing[n++] = j;
          counts[beam] = n;
        }
        listed = s;
      }
      const float* k_sh = K + s * kv_sentence + h * kv_head;
      const float* v_sh = V + s * v_sentence + h * v_head;
      for (int64_t beam = 0; beam < beams; ++beam) {
        const int64_t row = s * beams + beam;
        const float* q = P + row * p_row + h * d_head;
        const float* new_k = q + d_model;
        const float* new_v = q + 2 * d_model;
        const float* bias_row = B + s * b_sentence + beam * b_beam;
        const int64_t* listing = &slots[beam * written];
        const int64_t n = counts[beam];
        for (int64_t i = 0; i < n; ++i) {
          weights[i] = bias_row[listing[i]];
          key_of[i] = k_sh + listing[i] * kv_slot;
          value_of[i] = v_sh + listing[i] * v_slot;
        }
        int64_t i = 0;
        float products[4];
        for (; i + 4 <= n; i += 4) {
          dot4(q, &key_of[i], d_head, products);
          for (int64_t u = 0; u < 4; ++u) weights[i + u] += products[u] * scale;
        }
        for (; i < n; ++i) weights[i] += dot(q, key_of[i], d_head) * scale;
        weights[n] = dot(q, new_k, d_head) * scale;
        float top = kMinusInf;
        for (i = 0; i <= n; ++i) top = weights[i] > top ? weights[i] : top;
        at::vec::map([top](Vec x) { return (x - Vec(top)).exp_u20(); }, weights.data(),
                     weights.data(), n + 1);
        float total = 0.f;
        for (i = 0; i <= n; ++i) total += weights[i];
        const Vec inverse(1.0f / total);
        float* o = O + row * d_model + h * d_head;
        int64_t d = 0;
        for (; d + Vec::size() <= d_head; d += Vec::size()) {
          Vec sum = Vec(weights[n]) * Vec::loadu(new_v + d);
          for (i = 0; i < n; ++i)
            sum = at::vec::fmadd(Vec(weights[i]), Vec::loadu(value_of[i] + d), sum);
          (sum * inverse).store(o + d);
        }
        for (; d < d_head; ++d) {
          float sum = weights[n] * new_v[d];
          for (i = 0; i < n; ++i) sum += weights[i] * value_of[i][d];
          o[d] = sum / total;
        }
      }
    }
  });
  return out;
}

// log(sum(exp(x))) over n values, from their largest (a pass for it, one for the exponentials, by
// ATen's vectorised exp_u20): what a log-softmax subtracts.
inline float log_sum_exp(const float* x, int64_t n) {
  const float top =
      at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  const Vec top_v(top);
  const float total = at::vec::map_reduce_all<float>(
      [&](Vec v) { return (v - top_v).exp_u20(); }, [](Vec& a, Vec& b) { return a + b; }, x, n);
  return top + std::log(total);
}

// logits (rows, vocab), each row contiguous -> the same tensor, log_softmax over each row.
at::Tensor log_softmax_(at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu() &&
                  logits.stride(1) == 1,
              "logits: (rows, vocab) float32 on the CPU, each row contiguous");
  const int64_t rows = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  float* X = logits.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* x = X + r * row_stride;
      const Vec shift(log_sum_exp(x, vocab));
      at::vec::map([&](Vec v) { return v - shift; }, x, x, vocab);
    }
  });
  return logits;
}


// Insert value v at index i into best / at (k of them, largest first) if it is larger than the last:
// after the values equal to it, which came earlier in the row.
inline void insert_if_larger(float v, int64_t i, float* best, int64_t* at, int64_t k) {
  if (!(v > best[k - 1])) return;
  int64_t p = k - 1;
  for (; p > 0 && best[p - 1] < v; --p) {
    best[p] = best[p - 1];
    at[p] = at[p - 1];
  }
  best[p] = v;
  at[p] = i;
}

// The k largest of one row of n values into best and at (k each), largest first, as torch.topk
// gives them (of equal values, the first in the row first).
void topk_of_row(const float* row, int64_t n, int64_t k, float* best, int64_t* at) {
  int64_t i = 0;
  // The first k values all go in, whatever they are (-inf and NaN too), as torch.topk's would.
  for (; i < k; ++i) {
    int64_t p = i;
    for (; p > 0 && !(best[p - 1] >= row[i]); --p) {
      best[p] = best[p - 1];
      at[p] = at[p - 1];
    }
    best[p] = row[i];
    at[p] = i;
  }
  // A vector at a time: most hold nothing larger than the k-th largest so far.
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec larger = Vec::loadu(row + i) > Vec(best[k - 1]);
    if (larger.zero_mask() == (1 << Vec::size()) - 1) continue;
    for (int64_t j = i; j < i + Vec::size(); ++j) insert_if_larger(row[j], j, best, at, k);
  }
  for (; i < n; ++i) insert_if_larger(row[i], i, best, at, k);
}

// x (rows, n) float32 -> (values (rows, k), indices (rows, k) int64): each row's k largest, largest
// first. NaN is never among them past the first k values (it is not larger than anything).
std::tuple<at::Tensor, at::Tensor> row_topk(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "qkv::row_topk: x must be (rows, n) float32 on the CPU");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "qkv::row_topk: k must be between 1 and ", n, ", got ", k);
  const auto input = x.contiguous();
  auto values = at::empty({rows, k}, input.options());
  auto indices = at::empty({rows, k}, input.options().dtype(at::kLong));
  const float* X = input.data_ptr<float>();
  float* V = values.data_ptr<float>();
  int64_t* I = indices.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) topk_of_row(X + r * n, n, k, V + r * k, I + r * k);
  return {values, indices};
}

// What `op` takes: logits (rows, vocab) and a bias (vocab,) to add, float32 on the CPU.
void check_logits_and_bias(const at::Tensor& logits, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
              op, ": logits must be (rows, vocab) float32 on the CPU");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == logits.size(1) &&
                  bias.scalar_type() == at::kFloat && bias.device().is_cpu(),
              op, ": bias must be (vocab,) float32 on the CPU");
}

// logits (rows, vocab) float32, bias (vocab,) -> (log_softmax(logits) + bias (rows, vocab), and its
// k largest of each row with their indices (rows, k)): log_softmax_, the bias, then row_topk, a row
// at a time while it is in the first cache, the rows shared among the threads. In the program of
// beam 5 on one sentence, Inductor's log-softmax and qkv::row_topk after it were two kernels of
// ~21 µs each a step, this one call ~28 (small model, int8, Intel Xeon, kernel profile).
std::tuple<at::Tensor, at::Tensor, at::Tensor> log_softmax_topk(const at::Tensor& logits,
                                                                const at::Tensor& bias,
                                                                int64_t k) {
  check_logits_and_bias(logits, bias, "qkv::log_softmax_topk");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= vocab, "qkv::log_softmax_topk: k must be between 1 and ", vocab,
              ", got ", k);
  const auto input = logits.contiguous();
  const auto added = bias.contiguous();
  auto log_probs = at::empty({rows, vocab}, input.options());
  auto values = at::empty({rows, k}, input.options());
  auto indices = at::empty({rows, k}, input.options().dtype(at::kLong));
  const float* X = input.const_data_ptr<float>();
  const float* B = added.const_data_ptr<float>();
  float* L = log_probs.data_ptr<float>();
  float* V = values.data_ptr<float>();
  int64_t* I = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = X + r * vocab;
      float* out = L + r * vocab;
      const Vec shift(log_sum_exp(x, vocab));
      at::vec::map2([&](Vec v, Vec b) { return v - shift + b; }, out, x, B, vocab);
      topk_of_row(out, vocab, k, V + r * k, I + r * k);
    }
  });
  return {log_probs, values, indices};
}

// The first t with x[t] + b[t] == value (there is one), a vector at a time.
inline int64_t first_equal(const float* x, const float* b, int64_t n, float value) {
  const Vec wanted(value);
  const int all_lanes = (1 << Vec::size()) - 1;
  int64_t t = 0;
  for (; t + Vec::size() <= n; t += Vec::size()) {
    // zero_mask: a bit for each lane that is not equal
    const int unequal = ((Vec::loadu(x + t) + Vec::loadu(b + t)) == wanted).zero_mask();
    if (unequal != all_lanes) return t + __builtin_ctz(~unequal);
  }
  for (; t < n; ++t)
    if (x[t] + b[t] == value) return t;
  return 0;
}

// The first t with x[t] + b[t] NaN (there is one).
inline int64_t first_nan(const float* x, const float* b, int64_t n) {
  for (int64_t t = 0; t < n; ++t)
    if (std::isnan(x[t] + b[t])) return t;
  return 0;
}

// logits (rows, vocab) float32, bias (vocab,) -> (rows,) int64: each row's argmax of logits + bias,
// as torch.argmax gives it (the first of equal values; the first NaN, if any, as NaN is the largest),
// in two vector passes a row (the largest, then where it first is), the rows shared among the
// threads. A greedy step's best token: Inductor's argmax over 32 rows of the small model's 8000
// logits took ~185 µs a step on one thread (fp32, Intel Xeon, kernel profile).
at::Tensor biased_argmax(const at::Tensor& logits, const at::Tensor& bias) {
  check_logits_and_bias(logits, bias, "qkv::biased_argmax");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1, "qkv::biased_argmax: logits must have at least one column");
  const auto input = logits.contiguous();
  const auto added = bias.contiguous();
  auto best = at::empty({rows}, input.options().dtype(at::kLong));
  const float* X = input.const_data_ptr<float>();
  const float* B = added.const_data_ptr<float>();
  int64_t* I = best.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = X + r * vocab;
      // The largest of x + b, and whether any is NaN (x != x), a vector at a time.
      Vec top(kMinusInf), nan(0.f);
      int64_t j = 0;
      for (; j + Vec::size() <= vocab; j += Vec::size()) {
        const Vec v = Vec::loadu(x + j) + Vec::loadu(B + j);
        top = at::vec::maximum(top, v);  // NaN propagates: caught below
        nan = nan | (v != v);
      }
      float largest = kMinusInf;
      bool has_nan = false;
      {
        alignas(64) float tops[Vec::size()], nans[Vec::size()];
        top.store(tops), nan.store(nans);
        for (int64_t u = 0; u < Vec::size(); ++u) {
          has_nan |= nans[u] != 0.f || std::isnan(tops[u]);
          largest = tops[u] > largest ? tops[u] : largest;
        }
      }
      for (int64_t t = j; t < vocab; ++t) {
        const float v = x[t] + B[t];
        has_nan |= std::isnan(v);
        largest = v > largest ? v : largest;
      }
      // Where it first is: the first value equal to the largest (every value -inf: the first), a
      // vector at a time; with a NaN, the first NaN.
      I[r] = has_nan ? first_nan(x, B, vocab) : first_equal(x, B, vocab, largest);
    }
  });
  return best;
}

// Output features per panel of packed weights: two AVX2 vectors of 8 floats (the library is built
// with AVX2 and FMA on either capability, native.py's CAPABILITY_FLAGS).
constexpr int64_t kPanel = 16;
constexpr int64_t kDepthBlock = 256;  // input features per pass over a panel

// weight (out_features, in_features), bias (out_features,) -> (panels, in_features + 1, kPanel):
// panel p holds the output features p * kPanel ..., side by side for each input feature, then their
// biases; the last panel padded with zeros.
at::Tensor pack_linear(const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "weight: (out_features, in_features) float32 on the CPU");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_features && bias.scalar_type() == at::kFloat &&
                  bias.device().is_cpu(),
              "bias: (out_features,) float32 on the CPU");
  const int64_t panels = (out_features + kPanel - 1) / kPanel, depth = in_features + 1;
  auto packed = at::zeros({panels, depth, kPanel}, weight.options());
  const auto w = weight.contiguous();
  const auto b = bias.contiguous();
  const float* W = w.const_data_ptr<float>();
  const float* B = b.const_data_ptr<float>();
  float* P = packed.data_ptr<float>();
  for (int64_t n = 0; n < out_features; ++n) {
    float* column = P + (n / kPanel) * depth * kPanel + n % kPanel;
    for (int64_t k = 0; k < in_features; ++k) column[k * kPanel] = W[n * in_features + k];
    column[in_features * kPanel] = B[n];
  }
  return packed;
}

// Weights a register block asks of memory while it computes (`lines` cache lines from `weights`,
// one per input feature of a panel): the next stretch's, which no block reads yet. A step's products
// read every weight once (the base model's decoder: 105 MB a step, far past the caches), and the
// hardware's prefetcher does not run ahead of a stretch that the first block reads from memory and
// the others from the first cache. Held to AVX2 on a Zen 4, the base model's 37 products of a 32-row
// step in a row, best of 60: 11.7-12.9 ms without, 9.4-10.3 (once 11.4) with, into the second cache
// (10.2-14.9 into the first, which the stretch being read fills), against 7.8 if every weight were
// in the caches (215 GFLOP/s; benchmarks/README.md, session 34).
struct Ahead {
  const float* weights = nullptr;
  int64_t lines = 0;
};

// ROWS rows of x (row stride lda) times one panel of packed weights, plus the panel's biases (padded
// to kPanel): each output row's kPanel values in two registers, 2 x ROWS accumulators for the whole
// depth (12 at 6 rows, with the two weight vectors and a broadcast: 15 of AVX2's 16 registers).
template <int ROWS>
inline void panel_product(const float* x, int64_t lda, const float* panel, int64_t depth,
                          const float* bias, bool relu, float* out, int64_t ldc, int64_t columns,
                          Ahead ahead) {
  __m256 acc[ROWS][2];
  if (bias != nullptr) {
    const __m256 bias0 = _mm256_loadu_ps(bias), bias1 = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; ++i) acc[i][0] = bias0, acc[i][1] = bias1;
  } else {  // a later stretch of the depth: on from what the earlier ones left in the output
    alignas(32) float last[kPanel] = {};
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; ++i) {
      const float* o = out + i * ldc;
      if (columns != kPanel) std::copy(o, o + columns, last), o = last;
      acc[i][0] = _mm256_loadu_ps(o), acc[i][1] = _mm256_loadu_ps(o + 8);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    if (k < ahead.lines)  // one line of weights to come, into the core's second cache
      _mm_prefetch(reinterpret_cast<const char*>(ahead.weights + k * kPanel), _MM_HINT_T1);
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 6
    for (int i = 0; i < ROWS; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * lda + k);
      acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float last[kPanel];
#pragma GCC unroll 6
  for (int i = 0; i < ROWS; ++i) {
    if (relu) acc[i][0] = _mm256_max_ps(acc[i][0], zero), acc[i][1] = _mm256_max_ps(acc[i][1], zero);
    float* o = out + i * ldc;
    if (columns == kPanel) {
      _mm256_storeu_ps(o, acc[i][0]);
      _mm256_storeu_ps(o + 8, acc[i][1]);
    } else {  // the last panel, narrower than its padding
      _mm256_store_ps(last, acc[i][0]);
      _mm256_store_ps(last + 8, acc[i][1]);
      std::copy(last, last + columns, o);
    }
  }
}

// One row times one panel, the whole depth in one pass: four pairs of accumulators taking the input
// features in turn, and the weights asked for 64 lines (4 KB) ahead into the first cache. A greedy
// step of one sentence multiplies one row by every weight, and reads them as fast as memory gives
// them only so: the register block above at one row (one pair of accumulators, the depth in
// stretches, the next stretch asked for into the second cache) read 14-18 GB/s on one thread of the
// Intel Xeon held to AVX2, this 28-29 (a plain sum 26-27); at two threads 44-47 GB/s as Inductor's
// one-row products, against 50-53 (benchmarks/README.md, session 47).
constexpr int64_t kOneRowAhead = 64;  // lines of weights

inline void one_row_panel(const float* x, const float* panel, int64_t depth, bool relu, float* out,
                          int64_t columns) {
  const float* bias = panel + depth * kPanel;
  __m256 acc[4][2];
  acc[0][0] = _mm256_loadu_ps(bias), acc[0][1] = _mm256_loadu_ps(bias + 8);
  for (int j = 1; j < 4; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= depth; k += 4) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const float* w = panel + (k + j) * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(w + kOneRowAhead * kPanel), _MM_HINT_T0);
      const __m256 a = _mm256_broadcast_ss(x + k + j);
      acc[j][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(w), acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(a, _mm256_loadu_ps(w + 8), acc[j][1]);
    }
  }
  for (; k < depth; ++k) {
    const __m256 a = _mm256_broadcast_ss(x + k);
    acc[0][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(panel + k * kPanel), acc[0][0]);
    acc[0][1] = _mm256_fmadd_ps(a, _mm256_loadu_ps(panel + k * kPanel + 8), acc[0][1]);
  }
  __m256 sum0 = _mm256_add_ps(_mm256_add_ps(acc[0][0], acc[1][0]),
                              _mm256_add_ps(acc[2][0], acc[3][0]));
  __m256 sum1 = _mm256_add_ps(_mm256_add_ps(acc[0][1], acc[1][1]),
                              _mm256_add_ps(acc[2][1], acc[3][1]));
  if (relu) {
    sum0 = _mm256_max_ps(sum0, _mm256_setzero_ps());
    sum1 = _mm256_max_ps(sum1, _mm256_setzero_ps());
  }
  if (columns == kPanel) {
    _mm256_storeu_ps(out, sum0);
    _mm256_storeu_ps(out + 8, sum1);
  } else {  // the last panel, narrower than its padding
    alignas(32) float last[kPanel];
    _mm256_store_ps(last, sum0);
    _mm256_store_ps(last + 8, sum1);
    std::copy(last, last + columns, out);
  }
}

inline void rows_product(int64_t rows, const float* x, int64_t lda, const float* panel,
                         int64_t depth, const float* bias, bool relu, float* out, int64_t ldc,
                         int64_t columns, Ahead ahead) {
  switch (rows) {
    case 6: return panel_product<6>(x, lda, panel, depth, bias, relu, out, ldc, columns, ahead);
    case 5: return panel_product<5>(x, lda, panel, depth, bias, relu, out, ldc, columns, ahead);
    case 4: return panel_product<4>(x, lda, panel, depth, bias, relu, out, ldc, columns, ahead);
    case 3: return panel_product<3>(x, lda, panel, depth, bias, relu, out, ldc, columns, ahead);
    // block_rows never leaves a block of one row of several; one row alone takes one_row_panel.
    default: return panel_product<2>(x, lda, panel, depth, bias, relu, out, ldc, columns, ahead);
  }
}

// Rows per register block: 6 at a time (12 accumulators), the rest in blocks of 4 or fewer rather
// than leaving 1-2 rows for the last (7 -> 4 + 3, 8 -> 4 + 4).
inline int64_t block_rows(int64_t left) {
  if (left == 7 || left == 8) return 4;
  return left < 6 ? left : 6;
}

// x (..., in_features), packed by pack_linear from out_features x in_features weights; relu 0 or 1
// -> (..., out_features). The threads share the panels (output features), each reading its weights
// once.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         int64_t relu) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel &&
                  packed.size(0) == (out_features + kPanel - 1) / kPanel && packed.is_contiguous(),
              "packed: from qkv::pack_linear, of out_features output features");
  const int64_t depth = packed.size(1) - 1, panels = packed.size(0);
  TORCH_CHECK(x.size(-1) == depth, "x: (..., in_features), as the packed weight");
  for (const at::Tensor* t : {&x, &packed})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "float32 CPU tensors");
  const auto input = x.contiguous();
  const int64_t rows = input.numel() / depth;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  auto out = at::empty(shape, x.options());
  const float* X = input.const_data_ptr<float>();
  const float* W = packed.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  if (rows == 1) {
    // One row reads its weights from memory, which two cores do faster than one: shares of ~16K
    // (64 KB of weights), so that a 256 x 256 weight is shared too (small model, greedy on one
    // sentence held to AVX2, against Inductor's one-row products: 1.04x the time with the rows'
    // grain below, 0.98x with this; benchmarks/README.md, session 47).
    const int64_t one_row_grain =
        std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, depth * kPanel));
    at::parallel_for(0, panels, one_row_grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        one_row_panel(X, W + p * (depth + 1) * kPanel, depth, relu != 0, O + p * kPanel,
                      std::min(kPanel, out_features - p * kPanel));
    });
    return out;
  }
  // A thread's share at least ~64K multiply-adds: fewer cost more to hand out than they save.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, rows * depth * kPanel));
  int64_t blocks = 0;  // register blocks of rows
  for (int64_t r = 0; r < rows; ++blocks) r += block_rows(rows - r);
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t columns = std::min(kPanel, out_features - p * kPanel);
      const float* panel = W + p * (depth + 1) * kPanel;
      // A stretch of the depth at a time: its part of the panel (16 KB) stays in the core's first
      // cache while every row passes over it.
      for (int64_t k = 0; k < depth; k += kDepthBlock) {
        const int64_t stretch = std::min(kDepthBlock, depth - k);
        const float* bias = k == 0 ? panel + depth * kPanel : nullptr;
        const bool last = k + stretch == depth;
        // The next stretch of weights (this panel's, else this thread's next panel's first),
        // shared out among the row blocks (`Ahead`).
        Ahead next;
        if (!last)
          next = {panel + (k + stretch) * kPanel, std::min(kDepthBlock, depth - k - stretch)};
        else if (p + 1 < end)
          next = {panel + (depth + 1) * kPanel, std::min(kDepthBlock, depth)};
        const int64_t share = (next.lines + blocks - 1) / blocks;
        for (int64_t r = 0, b = 0; r < rows; ++b) {
          const int64_t n = block_rows(rows - r), from = std::min(next.lines, b * share);
          const Ahead ahead{next.weights + from * kPanel, std::min(next.lines - from, share)};
          rows_product(n, X + r * depth + k, depth, panel + k * kPanel, stretch, bias,
                       last && relu != 0, O + r * out_features + p * kPanel, out_features, columns,
                       ahead);
          r += n;
        }
      }
    }
  });
  return out;
}

// The output product screened (greedy without scores): an int8 copy of the output weights, each
// output feature (a row of the weight) quantised on its own, s_j = max |w_j| / 127, laid out as
// pack_linear's panels (16 features side by side for each input feature) -> (panels, in_features,
// 16) int8, and the scales (panels * 16,) (1 for a padding or all-zero feature).
std::tuple<at::Tensor, at::Tensor> pack_screen(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "qkv::pack_screen: weight must be (out_features, in_features) float32 on the CPU");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t panels = (out_features + kPanel - 1) / kPanel;
  auto q = at::zeros({panels, in_features, kPanel}, weight.options().dtype(at::kChar));
  auto scales = at::ones({panels * kPanel}, weight.options());
  const auto w = weight.contiguous();
  const float* W = w.const_data_ptr<float>();
  int8_t* Q = q.data_ptr<int8_t>();
  float* S = scales.data_ptr<float>();
  for (int64_t n = 0; n < out_features; ++n) {
    const float* row = W + n * in_features;
    float largest = 0.f;
    for (int64_t k = 0; k < in_features; ++k) largest = std::max(largest, std::abs(row[k]));
    const float scale = largest > 0.f && std::isfinite(largest) ? largest / 127.f : 1.f;
    S[n] = scale;
    int8_t* column = Q + (n / kPanel) * in_features * kPanel + n % kPanel;
    for (int64_t k = 0; k < in_features; ++k) {
      const float v = std::nearbyint(row[k] / scale);
      column[k * kPanel] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
    }
  }
  return {q, scales};
}

// One row times a panel of the int8 copy: 16 sums of x_k q_jk, four pairs of accumulators as
// one_row_panel.
inline void screen_panel(const float* x, const int8_t* panel, int64_t depth, float* sums) {
  __m256 acc[4][2];
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= depth; k += 4) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int8_t* w = panel + (k + j) * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(w + kOneRowAhead * 4 * kPanel), _MM_HINT_T0);
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
      const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
      const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
      const __m256 a = _mm256_broadcast_ss(x + k + j);
      acc[j][0] = _mm256_fmadd_ps(a, low, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(a, high, acc[j][1]);
    }
  }
  for (; k < depth; ++k) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(panel + k * kPanel));
    const __m256 a = _mm256_broadcast_ss(x + k);
    acc[0][0] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), acc[0][0]);
    acc[0][1] = _mm256_fmadd_ps(
        a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), acc[0][1]);
  }
  _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_add_ps(acc[0][0], acc[1][0]),
                                       _mm256_add_ps(acc[2][0], acc[3][0])));
  _mm256_storeu_ps(sums + 8, _mm256_add_ps(_mm256_add_ps(acc[0][1], acc[1][1]),
                                           _mm256_add_ps(acc[2][1], acc[3][1])));
}

// x (rows, in_features), the output product packed (pack_linear) and screened (pack_screen), and
// an additive bias (out_features,) (0, or -inf for the ids that may not come next) -> (rows,) int64:
// argmax over j of (packed_linear(x)_j + bias_j), the first of equal values, as the full product
// and torch.argmax give it. Each logit of the int8 copy is within e_j of the fp32 one (rounding to
// int8: s_j / 2 per unit of sum |x_k|; the sums' own rounding, bounded generously); the argmax is
// among the features whose upper bound reaches the largest lower bound, and their exact logits come
// from one_row_panel over their panels, as the full product computes them. A row that is not finite
// takes the full product.
at::Tensor screened_best(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& q,
                         const at::Tensor& scales, const at::Tensor& bias) {
  const int64_t depth = packed.size(1) - 1, panels = packed.size(0), out_features = bias.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat,
              "qkv::screened_best: packed from qkv::pack_linear");
  TORCH_CHECK(q.dim() == 3 && q.size(0) == panels && q.size(1) == depth && q.size(2) == kPanel &&
                  q.is_contiguous() && q.scalar_type() == at::kChar &&
                  scales.numel() == panels * kPanel,
              "qkv::screened_best: q and scales from qkv::pack_screen of the same weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.size(-1) == depth && bias.dim() == 1 &&
                  (out_features + kPanel - 1) / kPanel == panels &&
                  bias.scalar_type() == at::kFloat,
              "qkv::screened_best: x (..., in_features) and bias (out_features,) float32");
  const auto input = x.contiguous().view({-1, depth});
  const auto b = bias.contiguous();
  const int64_t rows = input.size(0);
  auto best = at::empty({rows}, x.options().dtype(at::kLong));
  const float* X = input.const_data_ptr<float>();
  const float* P = packed.const_data_ptr<float>();
  const int8_t* Q = q.const_data_ptr<int8_t>();
  const float* S = scales.const_data_ptr<float>();
  const float* C = b.const_data_ptr<float>();
  int64_t* out = best.data_ptr<int64_t>();
  // Not zeroed: every feature's is written before it is read.
  std::unique_ptr<float[]> approx_buffer(new float[panels * kPanel]);
  std::unique_ptr<float[]> errors_buffer(new float[panels * kPanel]);
  float* approx = approx_buffer.get();
  float* errors = errors_buffer.get();
  std::vector<float> exact(kPanel);
  // Relative rounding of a sum of depth + 2 terms in float, doubled for the margin.
  const float rounding = 4.f * static_cast<float>(depth + 2) * kEpsilon;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = X + r * depth;
    float magnitude = 0.f;
    for (int64_t k = 0; k < depth; ++k) magnitude += std::abs(row[k]);
    magnitude *= 1.f + rounding;
    if (!std::isfinite(magnitude)) {  // NaN or infinity: the full product, and ATen's argmax
      const auto logits = packed_linear(input.narrow(0, r, 1), packed, out_features, 0);
      out[r] = logits.squeeze(0).add(b).argmax().item<int64_t>();
      continue;
    }
    at::parallel_for(0, panels, std::max<int64_t>(1, (1 << 16) / (depth * kPanel)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t p = begin; p < end; ++p)
                         screen_panel(row, Q + p * depth * kPanel, depth, approx + p * kPanel);
                     });
    // The bounds: logit_j within errors[j] of approx[j] (its centre), a vector of features at a
    // time (a vector never crosses a panel: its biases lie side by side in the panel's last row).
    const Vec k_int8(0.5f + 127.f * rounding), k_bias(rounding), k_centre(8.f * kEpsilon);
    const Vec tiny(std::numeric_limits<float>::min()), mag(magnitude);
    Vec lower_v(kMinusInf);
    int64_t j = 0;
    for (; j + Vec::size() <= out_features; j += Vec::size()) {
      const Vec own =
          Vec::loadu(P + (j / kPanel) * (depth + 1) * kPanel + depth * kPanel + j % kPanel);
      const Vec scale = Vec::loadu(S + j);
      const Vec centre = scale * Vec::loadu(&approx[j]) + own + Vec::loadu(C + j);
      const Vec error = mag * scale * k_int8 + own.abs() * k_bias + centre.abs() * k_centre + tiny;
      centre.store(&approx[j]);
      error.store(&errors[j]);
      lower_v = at::vec::maximum(lower_v, centre - error);
    }
    alignas(64) float lanes[Vec::size()];
    lower_v.store(lanes);
    float largest_lower = kMinusInf;
    for (int64_t lane = 0; lane < Vec::size(); ++lane)
      largest_lower = std::max(largest_lower, lanes[lane]);
    for (; j < out_features; ++j) {
      const float own_bias = P[(j / kPanel) * (depth + 1) * kPanel + depth * kPanel + j % kPanel];
      const float centre = S[j] * approx[j] + own_bias + C[j];
      errors[j] = magnitude * S[j] * (0.5f + 127.f * rounding) + std::abs(own_bias) * rounding +
                  std::abs(centre) * 8.f * kEpsilon + std::numeric_limits<float>::min();
      approx[j] = centre;
      largest_lower = std::max(largest_lower, centre - errors[j]);
    }
    float top = 0.f;
    int64_t at = -1, computed = -1;
    const Vec largest_lower_v(largest_lower);
    for (j = 0; j < out_features; ++j) {
      if (j % Vec::size() == 0 && j + Vec::size() <= out_features) {  // a vector with no candidate
        const Vec upper = Vec::loadu(&approx[j]) + Vec::loadu(&errors[j]);
        if ((upper >= largest_lower_v).zero_mask() == (1 << Vec::size()) - 1) {
          j += Vec::size() - 1;
          continue;
        }
      }
      if (!(approx[j] + errors[j] >= largest_lower)) continue;
      const int64_t p = j / kPanel;
      if (p != computed) {
        one_row_panel(row, P + p * (depth + 1) * kPanel, depth, false, exact.data(),
                      std::min(kPanel, out_features - p * kPanel));
        computed = p;
      }
      const float v = exact[j % kPanel] + C[j];
      if (at < 0 || v > top) top = v, at = j;
    }
    out[r] = at < 0 ? 0 : at;
  }
  return best;
}

// What screening a row needs: the fp32 weights (out_features, depth) and biases, the int8 product's
// scales (sw_j) and sums of |q_j|, the banned ids' bias (0 or -inf), and the levels of a quantised
// row (qkv::packed_int8_linear's: 255 with VNNI, else 127).
struct RowScreen {
  const float* weight;
  const float* weight_bias;
  const float* scales;
  const float* l1;
  const float* bias;
  int64_t depth, out_features;
  float levels;
};

// Row x's exact logit of feature j, as screened_best_rows computes it.
inline float exact_logit(const RowScreen& screen, const float* x, int64_t j) {
  return dot(x, screen.weight + j * screen.depth, screen.depth) + screen.weight_bias[j] +
         screen.bias[j];
}

// Row x's argmax over every exact logit (the first NaN, as torch.argmax): where its screen is not
// finite.
int64_t every_logit_best(const RowScreen& screen, const float* x) {
  float top = 0.f;
  int64_t at = 0;
  for (int64_t j = 0; j < screen.out_features; ++j) {
    const float v = exact_logit(screen, x, j);
    if (std::isnan(v)) return j;
    if (j == 0 || v > top) top = v, at = j;
  }
  return at;
}

// Row x's best token (screened_best_rows): logits (out_features,) its int8 product's, overwritten
// by each feature's upper bound; candidates, a buffer for the features left.
int64_t screened_row_best(const RowScreen& screen, const float* x, float* logits,
                          std::vector<int64_t>& candidates) {
  const int64_t depth = screen.depth, n = screen.out_features;
  Vec sum_v(0.f), low_v(x[0]), high_v(x[0]);
  int64_t k = 0;
  for (; k + Vec::size() <= depth; k += Vec::size()) {
    const Vec v = Vec::loadu(x + k);
    sum_v = sum_v + v.abs();
    low_v = at::vec::minimum(low_v, v), high_v = at::vec::maximum(high_v, v);
  }
  float magnitude = sum_of(sum_v);
  float low = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, low_v);
  float high = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, high_v);
  for (; k < depth; ++k) {
    magnitude += std::abs(x[k]);
    low = std::isnan(x[k]) ? x[k] : std::min(low, x[k]);
    high = std::isnan(x[k]) ? x[k] : std::max(high, x[k]);
  }
  // Relative rounding of a sum of depth + 2 terms in float, doubled for the margin; a quantised
  // value's or weight's distance from its own within half a step and a little more (the division
  // by the scale is rounded, and the level from it)
  const float rounding = 4.f * static_cast<float>(depth + 2) * kEpsilon;
  const float half_w = 0.5f + 256.f * kEpsilon, half_x = 0.5f + 1024.f * kEpsilon;
  magnitude *= 1.f + rounding;
  const float s = high > low ? (high - low) / screen.levels : 1.f;  // the int8 product's step
  // e_j = sw_j (per_row + per_l1 |q_j|_1) + |bias_j| (rounding + 8 eps) + |logit_j| 8 eps: the
  // first two the bound above with their margins, the rest the rounding of the int8 product's
  // arithmetic after its integer sums and of the exact logits' sums
  const float per_row = half_w * magnitude +
                        2.f * static_cast<float>(depth) * s * half_x * half_w +
                        127.f * magnitude * rounding;
  const float per_l1 = s * half_x + (high - low + std::abs(low)) * 8.f * kEpsilon;
  if (!std::isfinite(per_row) || !std::isfinite(per_l1)) return every_logit_best(screen, x);
  const float k_bias = rounding + 8.f * kEpsilon, k_logit = 8.f * kEpsilon;
  const float tiny = std::numeric_limits<float>::min();
  const float *S = screen.scales, *L = screen.l1, *B = screen.weight_bias, *C = screen.bias;
  const Vec k_row_v(per_row), k_l1_v(per_l1), k_bias_v(k_bias), k_logit_v(k_logit);
  const Vec tiny_v(tiny), zero(0.f);
  Vec lower_v(kMinusInf), check(0.f);  // check: NaN once a bound is not finite
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec logit = Vec::loadu(logits + j);
    const Vec error = Vec::loadu(S + j) * (k_row_v + k_l1_v * Vec::loadu(L + j)) +
                      Vec::loadu(B + j).abs() * k_bias_v + logit.abs() * k_logit_v + tiny_v;
    check = check + (logit + error) * zero;
    const Vec centre = logit + Vec::loadu(C + j);
    (centre + error).store(logits + j);
    lower_v = at::vec::maximum(lower_v, centre - error);
  }
  float largest_lower = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, lower_v);
  bool finite = sum_of(check) == 0.f;
  for (; j < n; ++j) {
    const float error = S[j] * (per_row + per_l1 * L[j]) + std::abs(B[j]) * k_bias +
                        std::abs(logits[j]) * k_logit + tiny;
    finite = finite && std::isfinite(logits[j] + error);
    const float centre = logits[j] + C[j];
    logits[j] = centre + error;
    largest_lower = std::max(largest_lower, centre - error);
  }
  if (!finite || std::isnan(largest_lower)) return every_logit_best(screen, x);
  // The features whose upper bound reaches the largest lower bound, their weights asked of memory
  // all at once (one by one, each dot product waited for its weights: a third of the time)
  candidates.clear();
  const Vec largest_lower_v(largest_lower);
  for (j = 0; j < n; ++j) {
    if (j % Vec::size() == 0 && j + Vec::size() <= n) {  // a vector of none?
      if ((Vec::loadu(logits + j) >= largest_lower_v).zero_mask() == (1 << Vec::size()) - 1) {
        j += Vec::size() - 1;
        continue;
      }
    }
    if (logits[j] >= largest_lower) candidates.push_back(j);
  }
  for (const int64_t c : candidates)
    for (int64_t line = 0; line < depth; line += 16)
      _mm_prefetch(reinterpret_cast<const char*>(screen.weight + c * depth + line), _MM_HINT_T0);
  float top = 0.f;
  int64_t at = -1;
  for (const int64_t c : candidates) {
    const float v = exact_logit(screen, x, c);
    if (at < 0 || v > top) top = v, at = c;
  }
  return at < 0 ? 0 : at;
}

// The next token of a greedy step of many rows without every exact logit: qkv's int8 product
// (rowwise_int8.cpp: each row quantised on its own, x ~ s u + low with u in 0..levels; each
// feature's weights w_j ~ sw_j q_j) gives every logit within
//   e_j = sw_j (|x|_1 / 2 + n s / 2 + (s / 2) |q_j|_1) + the sums' rounding
// of the exact one, since x.w - x'.w' = x'.(w - w') + (x - x').w' + (x - x').(w - w'), each
// difference at most half a step of its own scale, and |x'|_1 <= |x|_1 + n s / 2. The features
// whose upper bound reaches the largest lower bound get their exact logits, each a dot product of
// the row with the feature's own fp32 weights (contiguous: a panel would read 16 features'). At
// 32 rows the int8 product reads a quarter of the fp32 one's bytes and does its arithmetic four to
// a lane, so the fp32 product's compute goes, not only its reads.
//
// x (rows, in_features); weight (out_features, in_features) and weight_bias (out_features,) fp32;
// weights, params from qkv::pack_int8_linear of them; l1 (out_features,) each feature's sum of
// |q_j|; bias (out_features,): 0, or -inf for the ids that may not come next -> (rows,) int64: each
// row's argmax over j of (x w_j + weight_bias_j + bias_j), the first of equal values, its exact
// logits as `dot` computes them (fp32, within rounding of any full product's). A row whose screen
// is not finite (non-finite or huge inputs) takes every logit by `dot`.
at::Tensor screened_best_rows(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& weight_bias, const at::Tensor& weights,
                              const at::Tensor& params, const at::Tensor& l1,
                              const at::Tensor& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat,
              "qkv::screened_best_rows: weight (out_features, in_features) float32, contiguous");
  const int64_t out_features = weight.size(0), depth = weight.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == depth,
              "qkv::screened_best_rows: x (..., in_features) float32");
  for (const auto* vector : {&weight_bias, &l1, &bias})
    TORCH_CHECK(vector->dim() == 1 && vector->size(0) == out_features && vector->is_contiguous() &&
                    vector->scalar_type() == at::kFloat,
                "qkv::screened_best_rows: weight_bias, l1 and bias (out_features,) float32");
  TORCH_CHECK(params.dim() == 2 && params.size(0) == 4 && params.size(1) >= out_features &&
                  params.is_contiguous() && params.scalar_type() == at::kFloat,
              "qkv::screened_best_rows: params from qkv::pack_int8_linear of the weight");
  const auto input = x.contiguous().view({-1, depth});
  const int64_t rows = input.size(0);
  auto best = at::empty({rows}, x.options().dtype(at::kLong));
  if (rows == 0) return best;
  // (rows, out_features): the int8 product's logits, the product's bias in them
  auto approx = qkv_native::rowwise_int8_product(input, weights, params, out_features, 0);
  const RowScreen screen{weight.const_data_ptr<float>(),
                         weight_bias.const_data_ptr<float>(),
                         params.const_data_ptr<float>(),  // each feature's scale: the first row
                         l1.const_data_ptr<float>(),
                         bias.const_data_ptr<float>(),
                         depth,
                         out_features,
                         qkv_int8_takes_vnni() ? 255.f : 127.f};
  const float* X = input.const_data_ptr<float>();
  float* logits = approx.data_ptr<float>();
  int64_t* out = best.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> candidates;
    for (int64_t r = begin; r < end; ++r)
      out[r] = screened_row_best(screen, X + r * depth, logits + r * out_features, candidates);
  });
  return best;
}

}  // namespace

// The attention operator as a C function of the kind AOTInductor calls for ATen's own operators (a
// "C shim"): a compiled program calls it directly (qkv/inference/native.py names it to Inductor)
// rather than through PyTorch's dispatcher from a description of the call (its "proxy executor").
extern "C" AOTITorchError aoti_torch_cpu_beam_self_attention(AtenTensorHandle projected,
                                                             AtenTensorHandle keys,
                                                             AtenTensorHandle values,
                                                             AtenTensorHandle bias,
                                                             AtenTensorHandle* result) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *result = torch::aot_inductor::new_tensor_handle(beam_self_attention(
        *tensor_handle_to_tensor_pointer(projected), *tensor_handle_to_tensor_pointer(keys),
        *tensor_handle_to_tensor_pointer(values), *tensor_handle_to_tensor_pointer(bias)));
  });
}

// The product as a C function too (packed is a constant of the program that calls it).
extern "C" AOTITorchError aoti_torch_cpu_packed_linear(AtenTensorHandle x, AtenTensorHandle packed,
                                                       int64_t out_features, int64_t relu,
                                                       AtenTensorHandle* result) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *result = torch::aot_inductor::new_tensor_handle(packed_linear(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(packed),
        out_features, relu));
  });
}

// The candidates as a C function too.
extern "C" AOTITorchError aoti_torch_cpu_row_topk(AtenTensorHandle x, int64_t k,
                                                  AtenTensorHandle* values,
                                                  AtenTensorHandle* indices) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    auto [top, at] = row_topk(*tensor_handle_to_tensor_pointer(x), k);
    *values = torch::aot_inductor::new_tensor_handle(std::move(top));
    *indices = torch::aot_inductor::new_tensor_handle(std::move(at));
  });
}

// A greedy step's best tokens as a C function too.
extern "C" AOTITorchError aoti_torch_cpu_biased_argmax(AtenTensorHandle logits,
                                                       AtenTensorHandle bias,
                                                       AtenTensorHandle* result) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *result = torch::aot_inductor::new_tensor_handle(biased_argmax(
        *tensor_handle_to_tensor_pointer(logits), *tensor_handle_to_tensor_pointer(bias)));
  });
}

// The log-probabilities and their candidates as a C function too.
extern "C" AOTITorchError aoti_torch_cpu_log_softmax_topk(AtenTensorHandle logits,
                                                          AtenTensorHandle bias, int64_t k,
                                                          AtenTensorHandle* log_probs,
                                                          AtenTensorHandle* values,
                                                          AtenTensorHandle* indices) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    auto [all, top, at] = log_softmax_topk(*tensor_handle_to_tensor_pointer(logits),
                                           *tensor_handle_to_tensor_pointer(bias), k);
    *log_probs = torch::aot_inductor::new_tensor_handle(std::move(all));
    *values = torch::aot_inductor::new_tensor_handle(std::move(top));
    *indices = torch::aot_inductor::new_tensor_handle(std::move(at));
  });
}

// A greedy step's screened next token as a C function too.
extern "C" AOTITorchError aoti_torch_cpu_screened_best(AtenTensorHandle x, AtenTensorHandle packed,
                                                       AtenTensorHandle q, AtenTensorHandle scales,
                                                       AtenTensorHandle bias,
                                                       AtenTensorHandle* result) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *result = torch::aot_inductor::new_tensor_handle(screened_best(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(packed),
        *tensor_handle_to_tensor_pointer(q), *tensor_handle_to_tensor_pointer(scales),
        *tensor_handle_to_tensor_pointer(bias)));
  });
}

// A greedy step's screened next tokens of many rows as a C function too.
extern "C" AOTITorchError aoti_torch_cpu_screened_best_rows(
    AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle weight_bias,
    AtenTensorHandle weights, AtenTensorHandle params, AtenTensorHandle l1, AtenTensorHandle bias,
    AtenTensorHandle* result) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *result = torch::aot_inductor::new_tensor_handle(screened_best_rows(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(weight),
        *tensor_handle_to_tensor_pointer(weight_bias), *tensor_handle_to_tensor_pointer(weights),
        *tensor_handle_to_tensor_pointer(params), *tensor_handle_to_tensor_pointer(l1),
        *tensor_handle_to_tensor_pointer(bias)));
  });
}

TORCH_LIBRARY(qkv, m) {
  m.def("beam_self_attention(Tensor projected, Tensor keys, Tensor values, Tensor bias) -> Tensor");
  m.def("log_softmax_(Tensor(a!) logits) -> Tensor(a!)");
  m.def("row_topk(Tensor x, int k) -> (Tensor, Tensor)");
  m.def("log_softmax_topk(Tensor logits, Tensor bias, int k) -> (Tensor, Tensor, Tensor)");
  m.def("biased_argmax(Tensor logits, Tensor bias) -> Tensor");
  m.def("pack_linear(Tensor weight, Tensor bias) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int out_features, int relu) -> Tensor");
  m.def("pack_screen(Tensor weight) -> (Tensor, Tensor)");
  m.def("screened_best(Tensor x, Tensor packed, Tensor q, Tensor scales, Tensor bias) -> Tensor");
  m.def("screened_best_rows(Tensor x, Tensor weight, Tensor weight_bias, Tensor weights, "
        "Tensor params, Tensor l1, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qkv, CPU, m) {
  m.impl("beam_self_attention", &beam_self_attention);
  m.impl("log_softmax_", &log_softmax_);
  m.impl("row_topk", &row_topk);
  m.impl("log_softmax_topk", &log_softmax_topk);
  m.impl("biased_argmax", &biased_argmax);
  m.impl("pack_linear", &pack_linear);
  m.impl("packed_linear", &packed_linear);
  m.impl("pack_screen", &pack_screen);
  m.impl("screened_best", &screened_best);
  m.impl("screened_best_rows", &screened_best_rows);
}
