"""mixed_tc (experiment): the tensor-core layout packs and unpacks every code, and the decode program
that the kernel's inline assembly is written from turns a lane's words into exactly its codes."""
import numpy as np
import pytest
import torch

import mixed_tc


@pytest.mark.parametrize("b", mixed_tc.TC_WIDTHS)
def test_pack_emulated_decode(b):
    bits = {mixed_tc.code_bit(b, m, kt, r, hf, i) for m in range(2) for kt in range(2) for r in range(4)
            for hf in range(2) for i in range(b)}
    assert len(bits) == 32 * b and all(0 <= w < b and 0 <= p < 32 for w, p in bits)  # every lane bit used once
    rng = np.random.default_rng(b)
    R, nt = 64, 3
    codes = torch.from_numpy(rng.integers(0, 2 ** b, (R, 2 * nt * 32))).int()
    blocks = [(0, nt, b, 0), (nt, 2 * nt, b, nt * b)]
    words = mixed_tc.pack(codes, blocks)
    assert words.shape == (2 * nt * b, R) and torch.equal(mixed_tc.unpack(words, blocks, R), codes)
    g, t = np.arange(32) // 4, np.arange(32) % 4
    for tile in range(2 * nt):
        lane_words = words.reshape(2 * nt, b, R // 32, 32)[tile].permute(1, 2, 0).numpy().astype(np.int64) & 0xFFFFFFFF
        vals = mixed_tc.emulate(b, lane_words.astype(np.uint64))  # (P, lane, m, kt, r, hf)
        for m in range(2):
            for kt in range(2):
                for r in range(4):
                    for hf in range(2):
                        ri, ci = mixed_tc.element_index(m, kt, r, hf, g, t)
                        rows = np.arange(R // 32)[:, None] * 32 + ri
                        ref = codes[torch.from_numpy(rows), torch.from_numpy(tile * 32 + ci)[None, :]].numpy()
                        assert np.array_equal(vals[:, :, m, kt, r, hf], ref)
    asm, cons = mixed_tc.ptx(b)
    assert asm.count("mma.sync") == 4 and cons.count("=f") == 8 and cons.count("r") == b + 4
