// qkv's own int8 product, qkv::pack_int8_linear and qkv::packed_int8_linear (qkv/inference/native.py
// builds this file with operators.cpp into one library; qkv/inference/rowwise_int8.py says why it
// exists and what it gave): x W^T + b (then a ReLU) by int8 weights packed once (one scale per output
// feature), each row of x quantised to bytes over its own range, the u8 x s8 sums by AMX's tiles
// (tdpbusd, 16 rows x 64 features, from 3 rows), by VNNI's dot products of 4 (vpdpbusd, 6 rows x 64
// features in AVX-512 registers), or by AVX2's pairs of 7-bit products (vpmaddubsw). PyTorch's
// dynamic int8 product prepares each call for many rows, at ~14 µs before any arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// Output features per panel of int8 weights: one AVX-512 vector of 16 int32 sums (two AVX2 ones),
// each summing kGroup products of adjacent input features (VNNI's vpdpbusd; AVX2's vpmaddubsw, then
// vpmaddwd by ones).
constexpr int64_t kInt8Panel = 16;
constexpr int64_t kGroup = 4;
// Input features per AMX step: a tile row of 64 bytes. The weights' depth is padded with zeros to a
// whole number of steps (for every path: one layout).
constexpr int64_t kAmxDepth = 64;

inline int64_t int8_groups(int64_t in_features) {
  return (in_features + kAmxDepth - 1) / kAmxDepth * (kAmxDepth / kGroup);
}

// weight (out_features, in_features) float32, bias (out_features,) or none ->
// (weights (panels, groups, kInt8Panel, kGroup) int8, params (4, panels x kInt8Panel) float32):
// each output feature's weights quantised to -127..127 by one scale (its largest magnitude / 127),
// in panels of kInt8Panel features, each feature's kGroup adjacent input features together (the
// depth padded to a whole number of kAmxDepth); params: the scales, each feature's sum of its int8
// weights (for the input's offset), the biases (padding 0), and in_features first in the last row
// (the padded weights do not say it).
std::tuple<at::Tensor, at::Tensor> pack_int8_linear(const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "qkv::pack_int8_linear: weight must be (out_features, in_features) float32 on the CPU");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t panels = (out_features + kInt8Panel - 1) / kInt8Panel;
  const int64_t groups = int8_groups(in_features);
  auto packed = at::zeros({panels, groups, kInt8Panel, kGroup}, weight.options().dtype(at::kChar));
  auto params = at::zeros({4, panels * kInt8Panel}, weight.options());
  const auto w = weight.contiguous();
  const float* W = w.const_data_ptr<float>();
  int8_t* P = packed.data_ptr<int8_t>();
  float* scales = params.data_ptr<float>();
  float* sums = scales + panels * kInt8Panel;
  float* biases = sums + panels * kInt8Panel;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features &&
                    bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "qkv::pack_int8_linear: bias must be (out_features,) float32 on the CPU");
    const auto b = bias->contiguous();
    std::copy(b.const_data_ptr<float>(), b.const_data_ptr<float>() + out_features, biases);
  }
  for (int64_t n = 0; n < out_features; ++n) {
    const float* row = W + n * in_features;
    float largest = 0.f;
    for (int64_t k = 0; k < in_features; ++k) largest = std::max(largest, std::abs(row[k]));
    const float scale = std::max(largest, 1e-8f) / 127.f;
    int64_t sum = 0;
    int8_t* feature = P + (n / kInt8Panel) * groups * kInt8Panel * kGroup + (n % kInt8Panel) * kGroup;
    for (int64_t k = 0; k < in_features; ++k) {
      const float q = std::clamp(std::nearbyint(row[k] / scale), -127.f, 127.f);
      feature[(k / kGroup) * kInt8Panel * kGroup + k % kGroup] = static_cast<int8_t>(q);
      sum += static_cast<int64_t>(q);
    }
    scales[n] = scale;
    sums[n] = static_cast<float>(sum);
  }
  biases[panels * kInt8Panel] = static_cast<float>(in_features);  // exact below 2^24
  return {packed, params};
}

// Whether the int8 products take VNNI's instructions: the library built for AVX-512 (ATen's
// capability) on a CPU that has AVX512-VNNI. Else AVX2's, whose 16-bit pair sums hold 7-bit inputs
// only (127 x 127 x 2 < 32768): the input is quantised to 0..127 then, not 0..255.
bool int8_takes_vnni() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool vnni = __builtin_cpu_supports("avx512vnni");
  return vnni;
#else
  return false;
#endif
}

// AMX's tile instructions (Intel Sapphire Rapids and later) where the compiler knows them.
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11)
#define QKV_AMX 1
#else
#define QKV_AMX 0
#endif

// Whether the int8 products take AMX's tiles: VNNI's conditions, a CPU with AMX-INT8 (CPUID), and
// Linux's permission for this process to use the tiles' state (asked once; oneDNN asks it too);
// not with QKV_INT8_AMX=0 (then VNNI's, as on a CPU without AMX: for tests and comparisons).
bool int8_takes_amx() {
#if QKV_AMX
  static const bool amx = [] {
    const char* switch_ = std::getenv("QKV_INT8_AMX");  // "0": VNNI's instructions instead
    if (!int8_takes_vnni() || (switch_ != nullptr && std::string(switch_) == "0")) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    return tile && int8 && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return amx;
#else
  return false;
#endif
}

// What a block of the product needs beside its weights: the quantised rows (row stride ldx bytes)
// with each row's scale and minimum, the features' scales, sums of weights and biases, and where
// its output goes.
struct Int8Block {
  const uint8_t* x;
  int64_t ldx;
  const float* row_scale;
  const float* row_min;
  const int8_t* panel;  // the block's first panel
  int64_t panel_bytes;  // from one panel to the next
  int64_t groups;
  const float* scales;  // the block's first feature's, and so on
  const float* sums;
  const float* biases;
  float* out;  // the block's first row's first feature
  int64_t ldo;
  int64_t columns;  // output features of the block (the last block's may stop inside a panel)
  bool relu;
};

// The output of the block's panel j: row i's 16 int32 sums -> scale_n (row_scale sum + row_min
// sum_of_weights_n) + bias_n (then a ReLU), the columns past the block's last masked off. The
// panel's scales, sums of weights and biases loaded once for its rows.
struct PanelOutput {
  __m512 scale, sum, bias;
  __mmask16 mask;
  int64_t first;

  __attribute__((target("avx512f,avx512bw"))) PanelOutput(const Int8Block& b, int64_t j)
      : first(j * kInt8Panel) {
    const int64_t columns = std::min<int64_t>(kInt8Panel, b.columns - first);
    mask = columns >= kInt8Panel ? 0xffff : (1u << std::max<int64_t>(columns, 0)) - 1;
    scale = _mm512_loadu_ps(b.scales + first);
    sum = _mm512_loadu_ps(b.sums + first);
    bias = _mm512_loadu_ps(b.biases + first);
  }

  __attribute__((target("avx512f,avx512bw"))) void store(const Int8Block& b, int64_t i,
                                                         __m512i sums) const {
    const __m512 offset = _mm512_mul_ps(_mm512_set1_ps(b.row_min[i]), sum);
    const __m512 dot =
        _mm512_fmadd_ps(_mm512_set1_ps(b.row_scale[i]), _mm512_cvtepi32_ps(sums), offset);
    __m512 value = _mm512_fmadd_ps(scale, dot, bias);
    if (b.relu) value = _mm512_max_ps(value, _mm512_setzero_ps());
    _mm512_mask_storeu_ps(b.out + i * b.ldo + first, mask, value);
  }
};

// ROWS rows times PANELS panels by VNNI: ROWS x PANELS int32 sums in registers (24 at 6 x 4, of
// AVX-512's 32), each group of weights loaded once for the rows and each row's four bytes once for
// the panels; then their output (`PanelOutput`). Each sum is named by an index fixed when the
// template is made (folds over index sequences, not loops): with loops over an array of them, GCC
// kept the array in memory and stored every sum at every step (1024 x 256 x 8000 at 0.41x fbgemm's
// speed, 160 rows 0.70-1.13x; in registers 1.38x and 1.05-1.46x; benchmarks/README.md, session 43).
#define QKV_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline

template <int... K>
QKV_VNNI void vnni_zero(__m512i* sums, std::integer_sequence<int, K...>) {
  ((sums[K] = _mm512_setzero_si512()), ...);
}

template <int... J>
QKV_VNNI void vnni_load(__m512i* w, const int8_t* group, int64_t panel_bytes,
                        std::integer_sequence<int, J...>) {
  ((w[J] = _mm512_loadu_si512(group + J * panel_bytes)), ...);
}

// Row I's four bytes of the group against each panel's weights.
template <int PANELS, int I, int... J>
QKV_VNNI void vnni_row(__m512i* sums, const __m512i* w, const uint8_t* bytes,
                       std::integer_sequence<int, J...>) {
  const __m512i a = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(bytes));
  ((sums[I * PANELS + J] = _mm512_dpbusd_epi32(sums[I * PANELS + J], a, w[J])), ...);
}

template <int PANELS, int... I>
QKV_VNNI void vnni_rows(__m512i* sums, const __m512i* w, const uint8_t* x, int64_t ldx,
                        std::integer_sequence<int, I...>) {
  (vnni_row<PANELS, I>(sums, w, x + I * ldx, std::make_integer_sequence<int, PANELS>{}), ...);
}

template <int PANELS, int J, int... I>
QKV_VNNI void vnni_panel_output(const Int8Block& b, const __m512i* sums,
                                std::integer_sequence<int, I...>) {
  const PanelOutput output(b, J);
  (output.store(b, I, sums[I * PANELS + J]), ...);
}

template <int ROWS, int PANELS, int... J>
QKV_VNNI void vnni_output(const Int8Block& b, const __m512i* sums,
                          std::integer_sequence<int, J...>) {
  (vnni_panel_output<PANELS, J>(b, sums, std::make_integer_sequence<int, ROWS>{}), ...);
}

template <int ROWS, int PANELS>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_block_vnni(const Int8Block& b) {
  constexpr auto panels = std::make_integer_sequence<int, PANELS>{};
  __m512i sums[ROWS * PANELS];
  vnni_zero(sums, std::make_integer_sequence<int, ROWS * PANELS>{});
  for (int64_t g = 0; g < b.groups; ++g) {
    __m512i w[PANELS];
    vnni_load(w, b.panel + g * kInt8Panel * kGroup, b.panel_bytes, panels);
    vnni_rows<PANELS>(sums, w, b.x + g * kGroup, b.ldx, std::make_integer_sequence<int, ROWS>{});
  }
  vnni_output<ROWS, PANELS>(b, sums, panels);
}

// ROWS rows times one panel by AVX2 (7-bit inputs): 2 x ROWS int32 sums in registers.
template <int ROWS>
__attribute__((target("avx2,fma"))) void int8_block_avx2(const Int8Block& b) {
  __m256i acc[ROWS][2];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
  for (int i = 0; i < ROWS; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < b.groups; ++g) {
    const int8_t* w = b.panel + g * kInt8Panel * kGroup;
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; ++i) {
      const __m256i a = _mm256_set1_epi32(
          *reinterpret_cast<const int32_t*>(b.x + i * b.ldx + g * kGroup));
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w0), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w1), ones));
    }
  }
  alignas(32) int32_t sums[kInt8Panel];
#pragma GCC unroll 4
  for (int i = 0; i < ROWS; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), acc[i][1]);
    float* o = b.out + i * b.ldo;
    for (int64_t c = 0; c < std::min(kInt8Panel, b.columns); ++c) {
      const float value =
          b.scales[c] * (b.row_scale[i] * static_cast<float>(sums[c]) + b.row_min[i] * b.sums[c]) +
          b.biases[c];
      o[c] = b.relu && value < 0.f ? 0.f : value;
    }
  }
}

constexpr int64_t kAmxFromRows = 3;
#if QKV_AMX
constexpr int64_t kAmxRows = 16;  // rows of a tile

// AMX's tile configuration (palette 1): tiles 0-3 the int32 sums of up to 4 panels (rows x 16),
// tile 4 the rows' bytes of a step (rows x 64), tiles 5-7 a panel's weights of a step (16 groups of
// 4 x 16 features).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_a_row[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile"))) void configure_tiles(int64_t rows) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = static_cast<uint8_t>(t >= 5 ? kAmxDepth / kGroup : rows);
    config.bytes_a_row[t] = 64;
  }
  // GCC's ldtilecfg tells the compiler it reads 8 bytes of the configuration, which may then drop
  // the stores of the rest: all of it is read.
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// `rows` (<= 16, as configured) rows times PANELS panels by AMX, the sums into sums (rows x
// PANELS x 16 int32), then their output (`PanelOutput`).
template <int PANELS>
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw"))) void int8_block_amx(
    const Int8Block& b, int64_t rows, int32_t* sums) {
  constexpr int64_t kStepBytes = kAmxDepth * kInt8Panel;  // a panel's weights of one step
  const int64_t steps = b.groups * kGroup / kAmxDepth, stride = PANELS * kInt8Panel * 4;
  _tile_zero(0);
  if constexpr (PANELS > 1) _tile_zero(1);
  if constexpr (PANELS > 2) _tile_zero(2);
  if constexpr (PANELS > 3) _tile_zero(3);
  const int8_t* w = b.panel;
  for (int64_t step = 0; step < steps; ++step, w += kStepBytes) {
    _tile_loadd(4, b.x + step * kAmxDepth, b.ldx);
    _tile_loadd(5, w, 64);
    _tile_dpbusd(0, 4, 5);
    if constexpr (PANELS > 1) {
      _tile_loadd(6, w + b.panel_bytes, 64);
      _tile_dpbusd(1, 4, 6);
    }
    if constexpr (PANELS > 2) {
      _tile_loadd(7, w + 2 * b.panel_bytes, 64);
      _tile_dpbusd(2, 4, 7);
    }
    if constexpr (PANELS > 3) {
      _tile_loadd(5, w + 3 * b.panel_bytes, 64);
      _tile_dpbusd(3, 4, 5);
    }
  }
  _tile_stored(0, sums, stride);
  if constexpr (PANELS > 1) _tile_stored(1, sums + kInt8Panel, stride);
  if constexpr (PANELS > 2) _tile_stored(2, sums + 2 * kInt8Panel, stride);
  if constexpr (PANELS > 3) _tile_stored(3, sums + 3 * kInt8Panel, stride);
  for (int j = 0; j < PANELS; ++j) {
    const PanelOutput output(b, j);
    for (int64_t i = 0; i < rows; ++i)
      output.store(b, i, _mm512_loadu_si512(sums + i * PANELS * kInt8Panel + j * kInt8Panel));
  }
}

inline void int8_tile_amx(int64_t rows, int64_t panels, const Int8Block& b, int32_t* sums) {
  switch (panels) {
    case 4: return int8_block_amx<4>(b, rows, sums);
    case 3: return int8_block_amx<3>(b, rows, sums);
    case 2: return int8_block_amx<2>(b, rows, sums);
    default: return int8_block_amx<1>(b, rows, sums);
  }
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }
#endif

constexpr int64_t kVnniRows = 6, kVnniPanels = 4, kAvx2Rows = 4;

template <int PANELS>
inline void int8_rows_vnni(int64_t rows, const Int8Block& b) {
  switch (rows) {
    case 6: return int8_block_vnni<6, PANELS>(b);
    case 5: return int8_block_vnni<5, PANELS>(b);
    case 4: return int8_block_vnni<4, PANELS>(b);
    case 3: return int8_block_vnni<3, PANELS>(b);
    case 2: return int8_block_vnni<2, PANELS>(b);
    default: return int8_block_vnni<1, PANELS>(b);
  }
}

// A block of up to kVnniRows rows x kVnniPanels panels (VNNI), or kAvx2Rows rows x one panel.
inline void int8_block(bool vnni, int64_t rows, int64_t panels, const Int8Block& b) {
  if (vnni) {
    switch (panels) {
      case 4: return int8_rows_vnni<4>(rows, b);
      case 3: return int8_rows_vnni<3>(rows, b);
      case 2: return int8_rows_vnni<2>(rows, b);
      default: return int8_rows_vnni<1>(rows, b);
    }
  }
  switch (rows) {
    case 4: return int8_block_avx2<4>(b);
    case 3: return int8_block_avx2<3>(b);
    case 2: return int8_block_avx2<2>(b);
    default: return int8_block_avx2<1>(b);
  }
}

// Rows per register block, as even as blocks of at most `most` can be (7 of 6 -> 4 + 3).
inline int64_t int8_block_rows(int64_t left, int64_t most) {
  const int64_t blocks = (left + most - 1) / most;
  return (left + blocks - 1) / blocks;
}

// One row of n floats -> n bytes 0..levels over the row's range: x ~ scale u + low. AVX2's vectors
// (the library is built with AVX2 on either capability), 32 values at a time, rounded to nearest.
void quantise_row(const float* row, int64_t n, float levels, uint8_t* u, float& scale, float& low) {
  using Vec = at::vec::Vectorized<float>;
  low = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, row, n);
  const float high =
      at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, row, n);
  scale = high > low ? (high - low) / levels : 1.f;
  const float inverse = 1.f / scale;
  const __m256 shift = _mm256_set1_ps(low), times = _mm256_set1_ps(inverse);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(levels);
  const auto level = [&](const float* x) {
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x), shift), times);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), top));
  };
  // Packing 4 x 8 int32 to bytes interleaves the two halves of each vector: put them back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m256i ab = _mm256_packus_epi32(level(row + k), level(row + k + 8));
    const __m256i cd = _mm256_packus_epi32(level(row + k + 16), level(row + k + 24));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + k), bytes);
  }
  for (; k < n; ++k)
    u[k] = static_cast<uint8_t>(std::nearbyint(std::clamp((row[k] - low) * inverse, 0.f, levels)));
}

// x (..., in_features) float32; weights, params from qkv::pack_int8_linear of out_features output
// features; relu 0 or 1 -> (..., out_features): x W^T + b (then a ReLU), each row of x quantised on
// its own to 0..levels over its own range [min, max] (x ~ scale u + min), so that a row's product
// does not depend on the other rows: sum_k x_k w_nk ~ w_scale_n (scale sum_k u_k q_nk + min sum_k
// q_nk).
at::Tensor packed_int8_linear(const at::Tensor& x, const at::Tensor& weights,
                              const at::Tensor& params, int64_t out_features, int64_t relu) {
  TORCH_CHECK(weights.dim() == 4 && weights.size(2) == kInt8Panel && weights.size(3) == kGroup &&
                  weights.scalar_type() == at::kChar && weights.is_contiguous() &&
                  weights.size(0) == (out_features + kInt8Panel - 1) / kInt8Panel,
              "qkv::packed_int8_linear: weights from qkv::pack_int8_linear, of out_features "
              "output features");
  TORCH_CHECK(params.dim() == 2 && params.size(0) == 4 &&
                  params.size(1) == weights.size(0) * kInt8Panel &&
                  params.scalar_type() == at::kFloat && params.is_contiguous(),
              "qkv::packed_int8_linear: params from qkv::pack_int8_linear");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "qkv::packed_int8_linear: x must be float32 on the CPU");
  const int64_t in_features = x.size(-1), panels = weights.size(0), groups = weights.size(1);
  const float* scales = params.const_data_ptr<float>();
  TORCH_CHECK(scales[3 * panels * kInt8Panel] == static_cast<float>(in_features) &&
                  int8_groups(in_features) == groups,
              "qkv::packed_int8_linear: x has ", in_features,
              " features, not the weights' in_features");
  const auto input = x.contiguous();
  const int64_t rows = in_features == 0 ? 0 : input.numel() / in_features;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  auto out = at::empty(shape, x.options());
  if (rows == 0) return out;
  const bool vnni = int8_takes_vnni();
  const float levels = vnni ? 255.f : 127.f;
  const int64_t ldx = groups * kGroup;
  // The quantised rows in a buffer this thread keeps (a new one each call, of 100s of KB, was
  // mapped afresh: a page fault a page). Their padding past in_features is left as it is: it meets
  // the weights' zero padding.
  thread_local std::vector<uint8_t> kept_rows;
  thread_local std::vector<float> kept_scales, kept_mins;
  if (kept_rows.size() < static_cast<size_t>(rows * ldx)) kept_rows.resize(rows * ldx);
  kept_scales.resize(rows), kept_mins.resize(rows);
  // Pointers, not the names: in the threads below, those would be each thread's own buffers.
  uint8_t* quantised = kept_rows.data();
  float* row_scale = kept_scales.data();
  float* row_min = kept_mins.data();
  const float* X = input.const_data_ptr<float>();
  // Many rows shared among the threads, 64K values at least a share.
  const int64_t rows_a_share = std::max<int64_t>(1, (1 << 16) / in_features);
  at::parallel_for(0, rows, rows_a_share, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantise_row(X + r * in_features, in_features, levels, quantised + r * ldx, row_scale[r],
                   row_min[r]);
  });
  const int8_t* Wq = weights.const_data_ptr<int8_t>();
  const float* sums_of_weights = scales + panels * kInt8Panel;
  const float* biases = sums_of_weights + panels * kInt8Panel;
  float* O = out.data_ptr<float>();
  // The threads share the output features, kVnniPanels panels at a time ("tiles"), each reading
  // its weights once; a thread's share at least ~128K multiply-adds.
  const int64_t tile = vnni ? kVnniPanels : 1, most_rows = vnni ? kVnniRows : kAvx2Rows;
  const int64_t tiles = (panels + tile - 1) / tile, panel_bytes = groups * kInt8Panel * kGroup;
  const int64_t grain =
      std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, rows * ldx * kInt8Panel * tile));
  // AMX from 3 rows: at 1-2 a tile's fixed cost was more than VNNI's few products (1 x 256 x 768:
  // 5.1 µs against 4.3; 3 rows 5.4 against 5.5, 5 rows 5.6 against 6.8). The same sums either way.
  const bool amx = rows >= kAmxFromRows && int8_takes_amx();
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
#if QKV_AMX
    alignas(64) int32_t amx_sums[kAmxRows * kVnniPanels * kInt8Panel];
    int64_t configured = 0;  // the rows the tiles are configured for
#endif
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first_panel = t * tile, n_panels = std::min(tile, panels - first_panel);
      const int64_t first = first_panel * kInt8Panel;
      for (int64_t r = 0; r < rows;) {
        const int64_t n = amx ? std::min(kAmxRows, rows - r) : int8_block_rows(rows - r, most_rows);
        const Int8Block block{quantised + r * ldx, ldx, row_scale + r, row_min + r,
                              Wq + first_panel * panel_bytes, panel_bytes,
                              groups, scales + first, sums_of_weights + first, biases + first,
                              O + r * out_features + first, out_features, out_features - first,
                              relu != 0};
#if QKV_AMX
        if (amx) {
          if (n != configured) configure_tiles(n), configured = n;
          int8_tile_amx(n, n_panels, block, amx_sums);
          r += n;
          continue;
        }
#endif
        int8_block(vnni, n, n_panels, block);
        r += n;
      }
    }
#if QKV_AMX
    if (configured != 0) release_tiles();  // the tiles' state, large, not kept past the task
#endif
  });
  return out;
}

}  // namespace

// For operators.cpp (qkv::screened_best_rows screens with it).
namespace qkv_native {
at::Tensor rowwise_int8_product(const at::Tensor& x, const at::Tensor& weights,
                                const at::Tensor& params, int64_t out_features, int64_t relu) {
  return packed_int8_linear(x, weights, params, out_features, relu);
}
}  // namespace qkv_native

// qkv's own int8 product as a C function too (weights and params: constants of the program).
extern "C" AOTITorchError aoti_torch_cpu_packed_int8_linear(AtenTensorHandle x,
                                                            AtenTensorHandle weights,
                                                            AtenTensorHandle params,
                                                            int64_t out_features, int64_t relu,
                                                            AtenTensorHandle* result) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *result = torch::aot_inductor::new_tensor_handle(packed_int8_linear(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(weights),
        *tensor_handle_to_tensor_pointer(params), out_features, relu));
  });
}

// Which instructions qkv::packed_int8_linear takes here, for Python (qkv/inference/rowwise_int8.py).
extern "C" int qkv_int8_takes_vnni() { return int8_takes_vnni() ? 1 : 0; }
extern "C" int qkv_int8_takes_amx() { return int8_takes_amx() ? 1 : 0; }

TORCH_LIBRARY_FRAGMENT(qkv, m) {
  m.def("pack_int8_linear(Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("packed_int8_linear(Tensor x, Tensor weights, Tensor params, int out_features, int relu)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(qkv, CPU, m) {
  m.impl("pack_int8_linear", &pack_int8_linear);
  m.impl("packed_int8_linear", &packed_int8_linear);
}
