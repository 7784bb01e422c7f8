# kernel<<<g, b, s, st>>>(args);  ->  emu::launch(dim3(g), dim3(b), s, [&] { kernel(args); });
# extern __shared__ T name[];    ->  T* name = emu dynamic shared memory;
# inline-PTX functions (HOST_BODIES) get host bodies; EDITS hook the look-back emulation.
# usage: transform.py in out [files appended to the result...]; out is rewritten only when its
# text changes (ninja then rebuilds only what changed).
import os, re, sys
src = open(sys.argv[1]).read()
base = os.path.basename(sys.argv[1])

# Host bodies of the device functions written in inline PTX, per file. Those a host kernel
# must not reach abort (emu::unsupported).
HOST_BODIES = {
    "mma.cuh": {
        "smem_u32": "return emu::smem_u32(p);",
        "cp_async16": "emu::cp_async16(smem, gmem, valid);",
        "cp_async_commit": "emu::cp_async_commit();",
        "cp_async_wait": "emu::cp_async_wait(N);",
        "ldmatrix_x4": "emu::ldmatrix(r, saddr, false);",
        "ldmatrix_x4_trans": "emu::ldmatrix(r, saddr, true);",
        "mma16816": "emu::mma16816(c, a, b0, b1, std::is_same_v<T, c10::BFloat16>);",
        "pack2": "return emu::pack2(lo, hi, std::is_same_v<T, c10::BFloat16>);",
        "tanh_approx": "return std::tanh(x);",
    },
    "issm_cuda.cuh": {
        "ld_acquire_flag": "return emu::ld_acquire(f);",
        "st_release_flag": "emu::st_release(f, v);",
    },
    "scan_cuda.cuh": {
        "ld_relaxed32": "return emu::ld_relaxed(p);",
        "ld_relaxed64": "return emu::ld_relaxed(p);",
        "st_relaxed32": "emu::st_relaxed(p, v);",
        "st_relaxed64": "emu::st_relaxed(p, v);",
    },
}
# Exact rewrites (each must occur once): emu::hide_states() makes the look-back walk.
EDITS = {
    # hide_states() != 0: every chunk tile publishes its aggregate and walks back; the walk passes the
    # inclusive states of all (1) / the odd (2) chunks after the first, folding their aggregates.
    "issm_cuda.cuh": [
        ("lb_k = ld_acquire_flag(flags + flag_index(tl, a, a.c - 1)) == kFlagIncl ? a.c - 1 : -1;",
         "lb_k = !emu::hide_states() && ld_acquire_flag(flags + flag_index(tl, a, a.c - 1)) == kFlagIncl ? a.c - 1 : -1;"),
        ("if (f == kFlagIncl) return k;",
         "if (f == kFlagIncl && (k == 0 || !emu::hide_states() || (emu::hide_states() == 2 && k % 2 == 0))) return k;"),
        # hide_states() == 2 also takes the staging's 64-bit offsets (fits32 false)
        ("return (kTS - 1) * v.s1 + (n3 - 1) * v.s3 < (int64_t(1) << 31);",
         "return emu::hide_states() != 2 && (kTS - 1) * v.s1 + (n3 - 1) * v.s3 < (int64_t(1) << 31);"),
    ],
    "scan_cuda.cuh": [
        ("return k < lb.n_strips ? kEmpty : ld_relaxed32(",
         "return k < lb.n_strips || emu::hide_states() ? kEmpty : ld_relaxed32("),
        ("st[q] = q < n ? ld_relaxed32(sq) : kEmpty;",
         "st[q] = q < n ? emu::lookback_state(ld_relaxed32(sq), aq) : kEmpty;"),
    ],
}
for old, new in EDITS.get(base, []):
    assert src.count(old) == 1, f"{base}: {old!r} found {src.count(old)} times"
    src = src.replace(old, new)
for name, body in HOST_BODIES.get(base, {}).items():
    m = list(re.finditer(r"__device__[^;{}]*?\b" + name + r"\s*\([^;{}]*\)\s*\{", src))
    assert len(m) == 1, f"{base}: {len(m)} definitions of {name}"
    b, d = m[0].end(), 1
    e = b
    while d:
        d += {"{": 1, "}": -1}.get(src[e], 0)
        e += 1
    src = src[:b] + " " + body + " " + src[e - 1:]
src = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>, ]+?)\s+(\w+)\[\];",
             r"\1* \2 = reinterpret_cast<\1*>(emu::dyn_smem());", src)
out, i = [], 0
while True:
    j = src.find("<<<", i)
    if j < 0: out.append(src[i:]); break
    # kernel name: back to the start of the expression (after ';', '{', '}', or newline indentation)
    k = j
    depth = 0
    while k > 0:
        c = src[k - 1]
        if c == '>': depth += 1
        elif c == '<': depth -= 1
        if depth == 0 and c in ";{}\n" : break
        k -= 1
    name = src[k:j].strip()
    lead = src[k:j][:len(src[k:j]) - len(src[k:j].lstrip())]
    e = src.find(">>>", j)
    cfg, d, cur = [], 0, ""
    for c in src[j + 3:e]:
        if c in "(<": d += 1
        if c in ")>": d -= 1
        if c == "," and d == 0: cfg.append(cur.strip()); cur = ""
        else: cur += c
    cfg.append(cur.strip())
    while len(cfg) < 4: cfg.append("0")
    # balanced args
    p = e + 3
    assert src[p] == "(", src[p:p+20]
    d, q = 0, p
    while True:
        if src[q] == "(": d += 1
        elif src[q] == ")":
            d -= 1
            if d == 0: break
        q += 1
    args = src[p + 1:q]
    assert src[q + 1] == ";"
    out.append(src[i:k] + f"{lead}emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), {cfg[2]}, [&] {{ {name}({args}); }});")
    i = q + 2
s = "".join(out)
s = re.sub(r"TORCH_LIBRARY_IMPL\(ssm_ext, CUDA, m\) \{", "[[maybe_unused]] static void emu_unused_registration(torch::Library& m) {", s)
s += "".join(open(f).read() for f in sys.argv[3:])
if not os.path.exists(sys.argv[2]) or open(sys.argv[2]).read() != s:
    open(sys.argv[2], "w").write(s)
