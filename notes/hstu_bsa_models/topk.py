"""The top-k kernel's per-query insertion (hstu_bsa_topk.cu) against the CPU op's partial_sort
order (descending score, ties to the lower index, own block +inf last among +inf), random scores
with ties and infinities. Run: python notes/hstu_bsa_models/topk.py"""
import random, math
def insert(sc, idl, count, cap, score, c):
    if count < cap: pos = count; count += 1
    elif score > sc[cap-1]: pos = cap - 1
    else: return count
    while pos > 0 and sc[pos-1] < score:
        sc[pos] = sc[pos-1]; idl[pos] = idl[pos-1]; pos -= 1
    sc[pos] = score; idl[pos] = c
    return count
def kernel(scores, own, S, s_eff):
    sc = [0.0]*s_eff; idl = [0]*s_eff; count = 0; thr = 0.0
    for c in range(own):  # tiles of 64 in order == plain order
        v = scores[c]
        if count < s_eff or v > thr:
            count = insert(sc, idl, count, s_eff, v, c)
            if count == s_eff: thr = sc[s_eff-1]
    count = insert(sc, idl, count, s_eff, math.inf, own)
    return idl[:count] + [-1]*(S-count)
def cpu(scores, own, S):
    cand = [(scores[c], c) for c in range(own)] + [(math.inf, own)]
    cand.sort(key=lambda x: (-x[0], x[1]))
    keep = min(S, own+1)
    return [c for _, c in cand[:keep]] + [-1]*(S-keep)
random.seed(0)
for trial in range(20000):
    own = random.randint(0, 40); S = random.randint(1, 12); s_eff = min(S, 41)
    pool = [random.choice([0.0, 1.0, 2.0, -math.inf, math.inf]) if random.random() < 0.3 else random.random() for _ in range(own)]
    assert kernel(pool, own, S, s_eff) == cpu(pool, own, S), (pool, own, S)
print("topk insertion == CPU partial_sort semantics")
