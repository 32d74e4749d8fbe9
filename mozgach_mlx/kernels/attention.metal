// Flash attention for MLX's Metal backend (mx.fast.metal_kernel bodies).
//
// STATUS: written against MLX 0.32's metal_kernel code generator, NEVER compiled or run on
// Apple hardware (the project's CI machine has no Metal). mozgach_mlx/attention/dispatch.py
// only uses it after a first-use self-check against the blockwise MLX path (values and
// gradients) passes; otherwise it warns once and falls back.
//
// The file holds several sections; mozgach_mlx/attention/gpu.py splits it at the
// "//== name ==" lines.
// MLX generates each kernel's signature: inputs `const device T* name`, outputs
// `device T* name`, the [[...]] attributes used below, and `template <...>` parameters:
//   T        element type of q/k/v/do (float, half, bfloat16_t); all math in float
//   D        head dim (64, 80, 96, 128)      L        sequence length
//   H, HKV   query / key-value heads (H % HKV == 0; GQA without repeating K/V)
//   CAUSAL   bool                              WINDOW   sliding window, 0 = none
// Layout: q, o, do (B, H, L, D); k, v (B, HKV, L, D); lse, delta (B, H, L) float,
// all row-contiguous. params[0] = softmax scale.
//
// Parallelisation: one 32-lane SIMD-group per row (a query row for the forward and dQ,
// a key row for dK/dV). Lane t owns dims t, t+32, ... so loads of a K/V row are
// coalesced; a dot product is a simd_sum. Nothing is L x L: the forward keeps the
// online-softmax state (m, l, acc) in registers and writes O and lse; the backward
// recomputes P = exp(S - lse) per (query, key) pair. dK/dV are computed per key row
// (looping over the queries and the group's heads that see it), so no atomics.

//== header ==
static constant constexpr const int kLanes = 32;

// Key range [lo, hi) visible to query row i.
inline void visible_keys(int i, int L, bool causal, int window, thread int& lo, thread int& hi) {
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
inline void visible_queries(int j, int L, bool causal, int window, thread int& lo, thread int& hi) {
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
  const int lane = int(thread_index_in_simdgroup);
  const int i = int(thread_position_in_grid.y);
  const int bh = int(thread_position_in_grid.z);
  if (i >= L) {
    return;  // the whole SIMD-group shares i (threadgroup x == 32)
  }
  const int b = bh / H;
  const int hk = (bh % H) / (H / HKV);
  const float sc = params[0];
  auto qr = q + (size_t(bh) * L + i) * D;
  auto kb = k + size_t(b * HKV + hk) * L * D;
  auto vb = v + size_t(b * HKV + hk) * L * D;

  float qv[NPL];
  float acc[NPL];
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    qv[e] = d < D ? float(qr[d]) * sc : 0.0f;
    acc[e] = 0.0f;
  }
  float m = -INFINITY;
  float l = 0.0f;
  int lo, hi;
  visible_keys(i, L, CAUSAL, WINDOW, lo, hi);
  for (int j = lo; j < hi; ++j) {
    auto kr = kb + size_t(j) * D;
    auto vr = vb + size_t(j) * D;
    float part = 0.0f;
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        part += qv[e] * float(kr[d]);
      }
    }
    const float s = simd_sum(part);
    const float m_new = max(m, s);
    const float alpha = metal::exp(m - m_new);  // exp(-inf) == 0 on the first key
    const float p = metal::exp(s - m_new);
    l = l * alpha + p;
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        acc[e] = acc[e] * alpha + p * float(vr[d]);
      }
    }
    m = m_new;
  }
  const float inv_l = 1.0f / l;  // l >= 1: every row sees at least its own key
  device T* orow = o + (size_t(bh) * L + i) * D;
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    if (d < D) {
      orow[d] = static_cast<T>(acc[e] * inv_l);
    }
  }
  if (lane == 0) {
    lse[size_t(bh) * L + i] = m + metal::log(l);
  }

//== backward_dq ==
  constexpr int NPL = (D + kLanes - 1) / kLanes;
  const int lane = int(thread_index_in_simdgroup);
  const int i = int(thread_position_in_grid.y);
  const int bh = int(thread_position_in_grid.z);
  if (i >= L) {
    return;
  }
  const int b = bh / H;
  const int hk = (bh % H) / (H / HKV);
  const float sc = params[0];
  const size_t row = size_t(bh) * L + i;
  auto qr = q + row * D;
  auto dor = dout + row * D;
  auto kb = k + size_t(b * HKV + hk) * L * D;
  auto vb = v + size_t(b * HKV + hk) * L * D;
  const float lse_i = lse[row];
  const float delta_i = delta[row];

  float qv[NPL];
  float dov[NPL];
  float dq[NPL];
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    qv[e] = d < D ? float(qr[d]) * sc : 0.0f;
    dov[e] = d < D ? float(dor[d]) : 0.0f;
    dq[e] = 0.0f;
  }
  int lo, hi;
  visible_keys(i, L, CAUSAL, WINDOW, lo, hi);
  for (int j = lo; j < hi; ++j) {
    auto kr = kb + size_t(j) * D;
    auto vr = vb + size_t(j) * D;
    float s_part = 0.0f;
    float dp_part = 0.0f;
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        s_part += qv[e] * float(kr[d]);
        dp_part += dov[e] * float(vr[d]);
      }
    }
    const float p = metal::exp(simd_sum(s_part) - lse_i);
    const float ds = p * (simd_sum(dp_part) - delta_i);
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + e * kLanes;
      if (d < D) {
        dq[e] += ds * float(kr[d]);
      }
    }
  }
  device T* dqr = dq_out + row * D;
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    if (d < D) {
      dqr[d] = static_cast<T>(dq[e] * sc);
    }
  }

//== backward_dkdv ==
  constexpr int NPL = (D + kLanes - 1) / kLanes;
  constexpr int REP = H / HKV;
  const int lane = int(thread_index_in_simdgroup);
  const int j = int(thread_position_in_grid.y);
  const int bk = int(thread_position_in_grid.z);  // b * HKV + hk
  if (j >= L) {
    return;
  }
  const int b = bk / HKV;
  const int hk = bk % HKV;
  const float sc = params[0];
  auto kr = k + (size_t(bk) * L + j) * D;
  auto vr = v + (size_t(bk) * L + j) * D;

  float kv[NPL];
  float vv[NPL];
  float dk[NPL];
  float dv[NPL];
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    kv[e] = d < D ? float(kr[d]) * sc : 0.0f;
    vv[e] = d < D ? float(vr[d]) : 0.0f;
    dk[e] = 0.0f;
    dv[e] = 0.0f;
  }
  int lo, hi;
  visible_queries(j, L, CAUSAL, WINDOW, lo, hi);
  for (int r = 0; r < REP; ++r) {
    const int bh = b * H + hk * REP + r;
    auto qb = q + size_t(bh) * L * D;
    auto dob = dout + size_t(bh) * L * D;
    auto lseb = lse + size_t(bh) * L;
    auto deltab = delta + size_t(bh) * L;
    for (int i = lo; i < hi; ++i) {
      auto qr = qb + size_t(i) * D;
      auto dor = dob + size_t(i) * D;
      float s_part = 0.0f;
      float dp_part = 0.0f;
      for (int e = 0; e < NPL; ++e) {
        const int d = lane + e * kLanes;
        if (d < D) {
          s_part += kv[e] * float(qr[d]);
          dp_part += vv[e] * float(dor[d]);
        }
      }
      const float p = metal::exp(simd_sum(s_part) - lseb[i]);
      const float ds = p * (simd_sum(dp_part) - deltab[i]);
      for (int e = 0; e < NPL; ++e) {
        const int d = lane + e * kLanes;
        if (d < D) {
          dv[e] += p * float(dor[d]);
          dk[e] += ds * float(qr[d]);
        }
      }
    }
  }
  device T* dkr = dk_out + (size_t(bk) * L + j) * D;
  device T* dvr = dv_out + (size_t(bk) * L + j) * D;
  for (int e = 0; e < NPL; ++e) {
    const int d = lane + e * kLanes;
    if (d < D) {
      dkr[d] = static_cast<T>(dk[e] * sc);
      dvr[d] = static_cast<T>(dv[e]);
    }
  }
