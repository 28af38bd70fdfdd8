"""Security (issue 17, class 6), outside the server (tests/test_adversarial_server.py has the server):

- LlamaDiskCache never executes what it finds in its folder: a planted pickle whose unpickling would create a
  file is skipped unopened, and damaged entries (truncated, altered bytes, a forged header, garbage) are refused
  with a warning instead of reaching llama.cpp or crashing.
- Chat templates render under limits: huge ranges, nested loops, repetition, formatting widths, recursion,
  big numbers and output floods end in a TemplateError within a few seconds, never an untyped
  MemoryError/RecursionError/OverflowError or a hang.

Each batch runs in a subprocess of its own (tests/adversarial.py): a crash or hang fails its case, not pytest.
"""

from __future__ import annotations

from adversarial import outcomes, summary

# ---- LlamaDiskCache ----
CACHE_SETUP = """
import hashlib, json, os, pickle, struct, tempfile, pathlib
import numpy as np
from llmplace.compat import LlamaDiskCache, LlamaState

folder = pathlib.Path(tempfile.mkdtemp())
marker = folder / "PWNED"

class Payload:  # unpickling this runs open(marker, "w"): the file appears if anything unpickles
    def __reduce__(self):
        return (open, (str(marker), "w"))

planted = folder / ("0" * 32 + ".llamastate")
planted.write_bytes(pickle.dumps(([1, 2, 3], Payload())))
(folder / ("1" * 32 + ".llamastate")).write_bytes(pickle.dumps(Payload()))  # the payload at the top level

def state(tokens, blob=b"\\x05\\x00\\x00\\x00llama" + bytes(range(200))):
    return LlamaState(np.asarray(tokens, dtype=np.intc), np.empty((0, 7), dtype=np.single), len(tokens), blob,
                      len(blob), 42)

def written(tokens):
    '''A fresh folder with one real entry for tokens; returns (folder, the entry's path).'''
    where = pathlib.Path(tempfile.mkdtemp())
    LlamaDiskCache(str(where))[tokens] = state(tokens)
    return where, next(where.glob("*.llamastate"))

def damaged(change):
    '''Write an entry, change its bytes, and look it up from a new cache: what the lookup gives.'''
    where, path = written([7, 8, 9])
    path.write_bytes(change(path.read_bytes()))
    try:
        return LlamaDiskCache(str(where))[[7, 8, 9]].n_tokens
    except KeyError:  # what a lookup that finds nothing usable raises (the completion then runs uncached)
        return "refused"

def forged_header(edit):
    '''Rewrite the JSON header (fixing the length prefix, keeping the checksum valid for the payload).'''
    def change(data):
        n = struct.unpack_from("<I", data, 8)[0]
        header = json.loads(data[12:12 + n])
        edit(header)
        raw = json.dumps(header).encode()
        return data[:8] + struct.pack("<I", len(raw)) + raw + data[12 + n:]
    return damaged(change)

def rechecksummed(change_payload):
    '''Alter the payload and recompute its checksum: an attacker who knows the format.'''
    def change(data):
        n = struct.unpack_from("<I", data, 8)[0]
        header = json.loads(data[12:12 + n])
        payload = change_payload(data[12 + n:])
        header["sha256"] = hashlib.sha256(payload).hexdigest()
        raw = json.dumps(header).encode()
        return data[:8] + struct.pack("<I", len(raw)) + raw + payload
    return damaged(change)

def planted_is_inert():
    cache = LlamaDiskCache(str(folder))
    found = [1, 2, 3] in cache
    try:
        cache[[1, 2, 3]]
    except KeyError:
        pass
    return ("ran" if marker.exists() else "inert", found)

def roundtrip():
    where, _ = written([4, 5, 6])
    got = LlamaDiskCache(str(where))[[4, 5, 6, 99]]
    return (got.input_ids.tolist(), got.n_tokens, got.seed, got.scores.shape, got.llama_state[:9])
"""

CACHE_CASES = {
    "planted_pickle_is_never_unpickled": "planted_is_inert()",
    "roundtrip_of_a_good_entry": "roundtrip()",
    "truncated_in_the_payload": "damaged(lambda d: d[:-10])",
    "truncated_in_the_header": "damaged(lambda d: d[:20])",
    "truncated_to_nothing": "damaged(lambda d: b'')",
    "one_state_byte_flipped": "damaged(lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]))",
    "garbage_file": "damaged(lambda d: os.urandom(4096))",
    "header_length_huge": "damaged(lambda d: d[:8] + struct.pack('<I', 0xFFFFFFFF) + d[12:])",
    "header_not_json": "damaged(lambda d: d[:12] + b'\\xff' * (struct.unpack_from('<I', d, 8)[0]) + d[12 + struct.unpack_from('<I', d, 8)[0]:])",
    "header_deeply_nested": "damaged(lambda d: d[:8] + struct.pack('<I', 200000) + b'[' * 100000 + b']' * 100000)",
    "header_state_size_inflated": "forged_header(lambda h: h.update(state_size=h['state_size'] + 10**12))",
    "header_key_not_ints": "forged_header(lambda h: h.update(key=['a', None, 1.5]))",
    "header_key_huge_ints": "forged_header(lambda h: h.update(key=[7, 8, 10**30]))",
    "header_wrong_version": "forged_header(lambda h: h.update(version=99))",
    "header_scores_shape_negative": "forged_header(lambda h: h.update(scores_shape=[-1, -4]))",
    "header_n_tokens_beyond_ids": "forged_header(lambda h: h.update(n_tokens=10**6))",
    "header_is_a_list": "forged_header(lambda h: (h.clear(), None))",
    "state_arch_altered_with_a_fresh_checksum": "rechecksummed(lambda p: p[:16] + b'qwen3' + p[21:])",
}


def test_the_disk_cache_runs_no_planted_code_and_refuses_damaged_entries():
    results = outcomes(CACHE_SETUP, CACHE_CASES)
    print(summary(results))
    assert all(r.kind == "ok" for r in results.values()), summary(results)
    assert results["planted_pickle_is_never_unpickled"].message == "('inert', False)"
    assert results["roundtrip_of_a_good_entry"].message == \
        "([4, 5, 6], 3, 42, (0, 7), b'\\x05\\x00\\x00\\x00llama')"
    refused = [name for name in CACHE_CASES if name not in ("planted_pickle_is_never_unpickled",
                                                             "roundtrip_of_a_good_entry")]
    # The lookup never returns a damaged entry's state.
    assert {name: results[name].message for name in refused} == dict.fromkeys(refused, "'refused'"), \
        summary(results)


REAL_STATE_SETUP = """
import hashlib, json, struct, tempfile, pathlib
import llmplace
from llmplace.compat import LlamaDiskCache

folder = pathlib.Path(tempfile.mkdtemp())
llm = llmplace.Llama(PATH, verbose=False, n_ctx=256, n_threads=1)
llm.set_cache(LlamaDiskCache(str(folder)))
first = llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]
entry = next(folder.glob("*.llamastate"))
good = entry.read_bytes()

def with_state(change):
    '''Replace the real entry's llama.cpp state bytes (checksum recomputed), then complete the same prompt
    with a new cache over the folder: the state reaches llama_state_set_data.'''
    n = struct.unpack_from("<I", good, 8)[0]
    header = json.loads(good[12:12 + n])
    start = 12 + n + 4 * header["input_ids"]
    state = change(good[start:])
    payload = good[12 + n:start] + state
    header.update(state_size=len(state), sha256=hashlib.sha256(payload).hexdigest())
    raw = json.dumps(header).encode()
    entry.write_bytes(good[:8] + struct.pack("<I", len(raw)) + raw + payload)
    llm.reset()
    llm.set_cache(LlamaDiskCache(str(folder)))
    return llm("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"] == first
""".replace("PATH", "{path!r}")

REAL_STATE_CASES = {
    "state_cut_in_half": "with_state(lambda s: s[:len(s) // 2])",
    "state_cell_count_huge": "with_state(lambda s: s[:9] + b'\\xff\\xff\\xff\\x7f' + s[13:])",
    "state_arch_length_huge": "with_state(lambda s: b'\\xff\\xff\\xff\\xff' + s[4:])",
    "state_zeroed_after_the_arch": "with_state(lambda s: s[:9] + bytes(len(s) - 9))",
    "state_random_tail": "with_state(lambda s: s[:64] + bytes((i * 37) % 251 for i in range(len(s) - 64)))",
}


def test_forged_states_with_valid_checksums_do_not_crash_the_interpreter(smollm2_path):
    """Past the file checks, llama.cpp's own state reader sees the bytes: it must refuse, not crash."""
    results = outcomes(REAL_STATE_SETUP.format(path=str(smollm2_path)), REAL_STATE_CASES)
    print(summary(results))
    assert all(r.kind in ("ok", "typed") for r in results.values()), summary(results)
