// Flash attention for MLX's CUDA backend (mx.fast.cuda_kernel bodies).
//
// STATUS: written against MLX 0.32's cuda_kernel code generator and compile-checked with
// nvcc -arch=sm_80 (tests/test_attention.py::test_cuda_kernel_source_compiles wraps the
// bodies the way MLX does; MLX itself compiles them with NVRTC at run time). It has NOT
// been run on an NVIDIA GPU. mozgach_mlx/attention/dispatch.py
// only uses it after a first-use self-check against the blockwise MLX path (values and
// gradients) passes; otherwise it warns once and falls back.
//
// Same algorithm, layout and template constants as attention.metal (see there):
// one 32-lane warp per row, lane t owns dims t, t+32, ...; dot products are warp
// reductions; nothing is L x L; dK/dV per key row, so no atomics. MLX generates the
// signature (`const T* name` inputs, `T* name` outputs) and `constexpr` / `using` lines
// for the template arguments inside the kernel body.

//== header ==
// No #includes: MLX compiles this with NVRTC after its own device headers.
constexpr int kLanes = 32;
using index_t = long long;  // 64-bit offsets: B*H*L*D can exceed 2^31

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, off);
  }
  return x;
}

// Key range [lo, hi) visible to query row i.
__device__ __forceinline__ void visible_keys(int i, int L, bool causal, int window, int& lo, int& hi) {
  lo = 0;
  hi = causal ? i + 1 : L;
  if (window > 0) {
    lo = max(0, i - window + 1);
    if (!causal) {
      hi = min(L, i + window);
    }
  }
}

// Query range [lo, hi) that sees key row j.
__device__ __forceinline__ void visible_queries(int j, int L, bool causal, int window, int& lo, int& hi) {
  lo = causal ? j : 0;
  hi = L;
  if (window > 0) {
    hi = min(L, j + window);
    if (!causal) {
      lo = max(0, j - window + 1);
    }
  }
}

//== forward ==
  constexpr int NPL = (D + kLanes - 1) / kLanes;  // dims per lane
  const int lane = int(threadIdx.x);
  const int i = int(blockIdx.y * blockDim.y + threadIdx.y);
  const int bh = int(blockIdx.z);
  if (i >= L) {
    return;  // the whole warp shares i (block x == 32)
  }
  const int b = bh / H;
  const int hk = (bh % H) / (H / HKV);
  const float sc = params[0];
  auto qr = q + (index_t(bh) * L + i) * D;
  auto kb = k + index_t(b * HKV + hk) * L * D;
  auto vb = v + index_t(b * HKV + hk) * L * D;

  float qv[NPL];
  float acc[NPL];
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    qv[e] = d < D ? static_cast<float>(qr[d]) * sc : 0.0f;
    acc[e] = 0.0f;
  }
  float m = __int_as_float(0xff800000);  // -inf
  float l = 0.0f;
  int lo, hi;
  visible_keys(i, L, CAUSAL, WINDOW, lo, hi);
  for (int j = lo; j < hi; ++j) {
    auto kr = kb + index_t(j) * D;
    auto vr = vb + index_t(j) * D;
    float part = 0.0f;
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        part += qv[e] * static_cast<float>(kr[d]);
      }
    }
    const float s = warp_sum(part);
    const float m_new = max(m, s);
    const float alpha = expf(m - m_new);  // exp(-inf) == 0 on the first key
    const float p = expf(s - m_new);
    l = l * alpha + p;
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        acc[e] = acc[e] * alpha + p * static_cast<float>(vr[d]);
      }
    }
    m = m_new;
  }
  const float inv_l = 1.0f / l;  // l >= 1: every row sees at least its own key
  T* orow = o + (index_t(bh) * L + i) * D;
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    if (d < D) {
      orow[d] = static_cast<T>(acc[e] * inv_l);
    }
  }
  if (lane == 0) {
    lse[index_t(bh) * L + i] = m + logf(l);
  }

//== backward_dq ==
  constexpr int NPL = (D + kLanes - 1) / kLanes;
  const int lane = int(threadIdx.x);
  const int i = int(blockIdx.y * blockDim.y + threadIdx.y);
  const int bh = int(blockIdx.z);
  if (i >= L) {
    return;
  }
  const int b = bh / H;
  const int hk = (bh % H) / (H / HKV);
  const float sc = params[0];
  const index_t row = index_t(bh) * L + i;
  auto qr = q + row * D;
  auto dor = dout + row * D;
  auto kb = k + index_t(b * HKV + hk) * L * D;
  auto vb = v + index_t(b * HKV + hk) * L * D;
  const float lse_i = lse[row];
  const float delta_i = delta[row];

  float qv[NPL];
  float dov[NPL];
  float dq[NPL];
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    qv[e] = d < D ? static_cast<float>(qr[d]) * sc : 0.0f;
    dov[e] = d < D ? static_cast<float>(dor[d]) : 0.0f;
    dq[e] = 0.0f;
  }
  int lo, hi;
  visible_keys(i, L, CAUSAL, WINDOW, lo, hi);
  for (int j = lo; j < hi; ++j) {
    auto kr = kb + index_t(j) * D;
    auto vr = vb + index_t(j) * D;
    float s_part = 0.0f;
    float dp_part = 0.0f;
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        s_part += qv[e] * static_cast<float>(kr[d]);
        dp_part += dov[e] * static_cast<float>(vr[d]);
      }
    }
    const float p = expf(warp_sum(s_part) - lse_i);
    const float ds = p * (warp_sum(dp_part) - delta_i);
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        dq[e] += ds * static_cast<float>(kr[d]);
      }
    }
  }
  T* dqr = dq_out + row * D;
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    if (d < D) {
      dqr[d] = static_cast<T>(dq[e] * sc);
    }
  }

//== backward_dkdv ==
  constexpr int NPL = (D + kLanes - 1) / kLanes;
  constexpr int REP = H / HKV;
  const int lane = int(threadIdx.x);
  const int j = int(blockIdx.y * blockDim.y + threadIdx.y);
  const int bk = int(blockIdx.z);  // b * HKV + hk
  if (j >= L) {
    return;
  }
  const int b = bk / HKV;
  const int hk = bk % HKV;
  const float sc = params[0];
  auto kr = k + (index_t(bk) * L + j) * D;
  auto vr = v + (index_t(bk) * L + j) * D;

  float kv[NPL];
  float vv[NPL];
  float dk[NPL];
  float dv[NPL];
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    kv[e] = d < D ? static_cast<float>(kr[d]) * sc : 0.0f;
    vv[e] = d < D ? static_cast<float>(vr[d]) : 0.0f;
    dk[e] = 0.0f;
    dv[e] = 0.0f;
  }
  int lo, hi;
  visible_queries(j, L, CAUSAL, WINDOW, lo, hi);
  for (int r = 0; r < REP; ++r) {
    const int bh = b * H + hk * REP + r;
    auto qb = q + index_t(bh) * L * D;
    auto dob = dout + index_t(bh) * L * D;
    auto lseb = lse + index_t(bh) * L;
    auto deltab = delta + index_t(bh) * L;
    for (int i = lo; i < hi; ++i) {
      auto qr = qb + index_t(i) * D;
      auto dor = dob + index_t(i) * D;
      float s_part = 0.0f;
      float dp_part = 0.0f;
      for (int e = 0; e < NPL; ++e) {
        const int d = lane + e * kLanes;
        if (d < D) {
          s_part += kv[e] * static_cast<float>(qr[d]);
          dp_part += vv[e] * static_cast<float>(dor[d]);
        }
      }
      const float p = expf(warp_sum(s_part) - lseb[i]);
      const float ds = p * (warp_sum(dp_part) - deltab[i]);
      for (int e = 0; e < NPL; ++e) {
        const int d = lane + e * kLanes;
        if (d < D) {
          dv[e] += p * static_cast<float>(dor[d]);
          dk[e] += ds * static_cast<float>(qr[d]);
        }
      }
    }
  }
  T* dkr = dk_out + (index_t(bk) * L + j) * D;
  T* dvr = dv_out + (index_t(bk) * L + j) * D;
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    if (d < D) {
      dkr[d] = static_cast<T>(dk[e] * sc);
      dvr[d] = static_cast<T>(dv[e]);
    }
  }
