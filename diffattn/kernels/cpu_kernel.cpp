// Block-sparse flash attention for CPUs: one task per (batch, head, query block), online softmax over
// the listed key blocks. Consecutive listed blocks are contiguous rows of K and V, so each run of them
// is one BLAS call on the tensors in place: nothing is gathered or copied, and the work scales with
// the number of listed blocks. fp32 in and out; the Python side casts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// The BLAS that PyTorch itself links (MKL on x86 builds); the Fortran interface is the one exported.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0, exact zero below -87 (so -inf scores give 0); eight lanes in GCC/Clang vector
// extensions (AVX2 registers where built with -mavx2, two SSE/NEON halves elsewhere). Error ~1 ulp:
// degree-7 Taylor polynomial of 2^f for |f| <= 1/2 times 2^n built in the exponent bits.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f exp8_nonpos(v8f x) {
  const v8f lo = v8f{} - 87.0f;
  const v8f t = (x < lo ? lo : x) * 1.44269504088896341f;
  // Truncating t - 1/2 (t <= 0) rounds t to a nearest integer n, so |t - n| <= 1/2.
  const v8i n = __builtin_convertvector(t - 0.5f, v8i);
  const v8f y = (t - __builtin_convertvector(n, v8f)) * 0.693147180559945309f;
  v8f p = v8f{} + 1.0f / 5040.0f;
  p = p * y + 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const v8f two_n = (v8f)((n + 127) << 23);
  return x < lo ? v8f{} : p * two_n;
}

// s[i] = exp(s[i] - shift) in place (s[i] <= shift); returns the sum.
inline float exp_sum_inplace(float* s, int n, float shift) {
  v8f acc{};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f x;
    std::memcpy(&x, s + i, sizeof(x));
    x = exp8_nonpos(x - shift);
    std::memcpy(s + i, &x, sizeof(x));
    acc += x;
  }
  if (i < n) {
    v8f x = v8f{} + kNegInf;
    std::memcpy(&x, s + i, sizeof(float) * (n - i));
    x = exp8_nonpos(x - shift);
    std::memcpy(s + i, &x, sizeof(float) * (n - i));
    acc += x;
  }
  float sum = 0.0f;
  for (int lane = 0; lane < 8; ++lane) sum += acc[lane];
  return sum;
}

inline float exp_nonpos(float x) { return exp8_nonpos(v8f{} + x)[0]; }

inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

}  // namespace

// q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] fp32 contiguous; kv_indices / kv_mask_ids int32
// [LB, LH, Mq, Kmax], kv_counts int32 [LB, LH, Mq] (LB, LH in {1, B/H}); block_masks bool [P, bq, bk]
// (P = 0 when there are no partial blocks). Returns o fp32 [B, H, Nq, Dv] and lse fp32 [B, H, Nq].
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& kv_indices, const at::Tensor& kv_counts,
                                const at::Tensor& kv_mask_ids, const at::Tensor& block_masks, double scale,
                                int64_t block_q, int64_t block_k, int64_t max_cols) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "q, k, v must be float32");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(2), Dv = v.size(3);
  const int64_t LB = kv_counts.size(0), LH = kv_counts.size(1), Mq = kv_counts.size(2);
  const int64_t Kmax = kv_indices.size(3);
  const bool partial = block_masks.numel() > 0;
  const int64_t bq = block_q, bk = block_k;
  // A run is cut after max_cols keys (whole blocks) so the score tile stays in cache.
  const int64_t blocks_per_seg = std::max<int64_t>(1, max_cols / bk);

  auto o = at::empty({B, H, Nq, Dv}, q.options());
  auto lse = at::empty({B, H, Nq}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* idxp = kv_indices.data_ptr<int32_t>();
  const int32_t* cntp = kv_counts.data_ptr<int32_t>();
  const int32_t* pidp = partial ? kv_mask_ids.data_ptr<int32_t>() : nullptr;
  const bool* bmp = partial ? block_masks.data_ptr<bool>() : nullptr;
  float* op = o.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * H * Mq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(bq * blocks_per_seg * bk);
    std::vector<float> acc_buf(bq * Dv);
    std::vector<float> m_buf(bq), l_buf(bq);
    float* S = s_buf.data();
    float* acc = acc_buf.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % Mq;
      const int64_t bh = task / Mq;
      const int64_t b = bh / H, h = bh % H;
      const int64_t lrow = ((LB > 1 ? b : 0) * LH + (LH > 1 ? h : 0)) * Mq + qb;
      const int32_t* idx = idxp + lrow * Kmax;
      const int32_t* pid = partial ? pidp + lrow * Kmax : nullptr;
      const int64_t cnt = cntp[lrow];
      const int64_t r0 = qb * bq;
      const int rows = static_cast<int>(std::min(bq, Nq - r0));
      const float* Q = qp + (bh * Nq + r0) * D;
      const float* K = kp + bh * Nk * D;
      const float* V = vp + bh * Nk * Dv;
      std::fill(m_buf.begin(), m_buf.end(), kNegInf);
      std::fill(l_buf.begin(), l_buf.end(), 0.0f);
      bool first = true;
      int64_t j = 0;
      while (j < cnt) {
        int64_t j1 = j + 1;
        while (j1 < cnt && j1 - j < blocks_per_seg && idx[j1] == idx[j1 - 1] + 1) ++j1;
        const int64_t c0 = static_cast<int64_t>(idx[j]) * bk;
        const int cols = static_cast<int>(std::min<int64_t>((static_cast<int64_t>(idx[j1 - 1]) + 1) * bk, Nk) - c0);
        // S[rows, cols] = scale * Q K^T (column-major view: S^T = K Q^T).
        gemm('T', 'N', cols, rows, static_cast<int>(D), fscale, K + c0 * D, static_cast<int>(D), Q,
             static_cast<int>(D), 0.0f, S, cols);
        if (partial) {
          for (int64_t jj = j; jj < j1; ++jj) {
            const int32_t p = pid[jj];
            if (p < 0) continue;
            const int64_t off = (jj - j) * bk;
            const int64_t w = std::min<int64_t>(bk, cols - off);
            const bool* tile = bmp + p * bq * bk;
            for (int r = 0; r < rows; ++r) {
              float* srow = S + r * cols + off;
              const bool* mrow = tile + r * bk;
              for (int64_t c = 0; c < w; ++c) srow[c] = mrow[c] ? srow[c] : kNegInf;
            }
          }
        }
        for (int r = 0; r < rows; ++r) {
          float* srow = S + r * cols;
          float mx = kNegInf;
#pragma omp simd reduction(max : mx)
          for (int c = 0; c < cols; ++c) mx = std::max(mx, srow[c]);
          const float m_old = m_buf[r];
          const float m_new = std::max(m_old, mx);
          // A row with nothing kept so far: probabilities 0 (exp_nonpos(-inf) = 0), nothing to rescale.
          const float shift = m_new == kNegInf ? 0.0f : m_new;
          const float sum = exp_sum_inplace(srow, cols, shift);
          const float alpha = m_old == kNegInf ? 0.0f : exp_nonpos(m_old - shift);
          l_buf[r] = l_buf[r] * alpha + sum;
          m_buf[r] = m_new;
          if (!first && alpha != 1.0f) {
            float* arow = acc + r * Dv;
#pragma omp simd
            for (int64_t c = 0; c < Dv; ++c) arow[c] *= alpha;
          }
        }
        // acc[rows, Dv] (+)= P V (column-major view: acc^T = V^T P^T).
        gemm('N', 'N', static_cast<int>(Dv), rows, cols, 1.0f, V + c0 * Dv, static_cast<int>(Dv), S, cols,
             first ? 0.0f : 1.0f, acc, static_cast<int>(Dv));
        first = false;
        j = j1;
      }
      float* O = op + (bh * Nq + r0) * Dv;
      float* L = lp + bh * Nq + r0;
      for (int r = 0; r < rows; ++r) {
        const float l = l_buf[r];
        float* orow = O + r * Dv;
        if (first || !(l > 0.0f)) {
          std::fill(orow, orow + Dv, 0.0f);
          L[r] = kNegInf;
          continue;
        }
        const float inv = 1.0f / l;
        const float* arow = acc + r * Dv;
#pragma omp simd
        for (int64_t c = 0; c < Dv; ++c) orow[c] = arow[c] * inv;
        L[r] = m_buf[r] + std::log(l);
      }
    }
  });
  return {o, lse};
}

// An operator rather than a Python module: no pybind11 headers, so the one-off build is much shorter.
TORCH_LIBRARY(diffattn_cpu, m) { m.def("forward", &forward); }
