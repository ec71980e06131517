"""Brute-force references the tests compare the fast layers and graphs against."""

import torch


def brute_maxmod(x, k, s, p):
    """Loop reference on [N, P, C, H, W]: in each window the element of largest |f|^2 (summed over parts), the first one (row-major) on ties."""
    n, parts, c, h, w = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = torch.zeros(n, parts, c, ho, wo)
    for i in range(n):
        for ch in range(c):
            for oy in range(ho):
                for ox in range(wo):
                    best, arg = -1.0, None
                    for dy in range(k):
                        for dx in range(k):
                            y, xx = oy * s - p + dy, ox * s - p + dx
                            if 0 <= y < h and 0 <= xx < w:
                                m = float(sum(x[i, q, ch, y, xx] ** 2 for q in range(parts)))
                                if m > best:  # strict: the first maximum wins ties
                                    best, arg = m, (y, xx)
                    out[i, :, ch, oy, ox] = x[i, :, ch, arg[0], arg[1]]
    return out


def tied(n, c, h, w):
    """Every element has |f| = 1 exactly ((+-0.6, +-0.8) and (+-0.8, +-0.6) square to the same float),
    with random phases: every window is a tie that only the first-in-window rule decides."""
    pairs = torch.tensor([[0.6, 0.8], [0.8, 0.6], [-0.6, 0.8], [0.8, -0.6], [-0.8, -0.6], [0.6, -0.8]])
    return pairs[torch.randint(len(pairs), (n, c, h, w))].permute(0, 4, 1, 2, 3).contiguous()


def brute_top_gap(x, k, s, p, d=1, ceil_mode=False):
    """Loop reference of CMaxModPool2d.top_gap on [N, P, C, H, W]: per sample, the smallest gap between a
    window's largest and second-largest |f|^2 (windows with one valid element skipped), over the peak."""
    n, parts, c, h, w = x.shape
    m = (x ** 2).sum(1)

    def size(length):
        span = length + 2 * p - d * (k - 1) - 1
        out = -(-span // s) + 1 if ceil_mode else span // s + 1
        return out - 1 if ceil_mode and (out - 1) * s >= length + p else out  # a window must start inside

    out = torch.full((n,), float("inf"))
    for i in range(n):
        for ch in range(c):
            for oy in range(size(h)):
                for ox in range(size(w)):
                    vals = sorted((float(m[i, ch, oy * s - p + a * d, ox * s - p + b * d])
                                   for a in range(k) for b in range(k)
                                   if 0 <= oy * s - p + a * d < h and 0 <= ox * s - p + b * d < w), reverse=True)
                    if len(vals) > 1:
                        out[i] = min(out[i], vals[0] - vals[1])
    return out / m.flatten(1).amax(1)
