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
