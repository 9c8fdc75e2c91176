#!/usr/bin/env bash
# The GPU measurements this code is waiting for (see RESULTS.md: the sessions of 2026-12-04 21:14 and 2026-12-05 02:32,
# 05:23). The issues' goals are H200 figures; the device tool now lends mostly H100s: an A/B (both arms in one process)
# decides on either card, the suite's absolute figures only on an H200 (name the card in RESULTS.md).
# Run from the repository root on the device, one part per call (each part < 600 s), results under $OUT/<name>/.
# (2026-12-05 12:45, H100: jf19 ran — one-token prefills as decode flipped on; jf19r repeats the rest.)
# (2026-12-05 13:50-14:33: jf19r and f5 on an H100, f5, adm's first two runs and jf21 on an H200 — RESULTS.md, section
# "(f) measured as repeated pairs"; left: adm's deferred arms, then suite_aeg, suite_bf, lora64, w4a.)
# (2026-12-06 01:29-01:41, one H200 after five failed starts: jf23, jf22s twice and adm ran — RESULTS.md, section "(f): the
# overlapped constrained prefill decided, forced rows as repeated pairs"; jf17/19/19r/21/22 and adm_f, decided, are gone
# from this script, their commands in RESULTS.md. Left: `final suite_aeg suite_bf lora64 w4a`; `final jf23` again for
# where forced rows' first extra-rows step spends its 130-157 ms.)
# Every new GPU path below is off by default; flip the constant / flag named in each comment only where its A/B wins,
# then run part "final" (the suite and the rows of the issues) on that commit.
# Needs the wheels the device lacks (llguidance, gguf, outlines-core, interegular, jsonschema and its deps) installed
# first, as the device tool's README says (llguidance: --platform manylinux_2_31_x86_64).
# Carry `.whl` and `.gpu_assets` (the tokenizer folder item f reads; ignored by git, so it travels only when named).
#   bash benchmarks/h200_pending.sh ab      (jf18 ~90 s: (f)'s decode
#                                            step op by op, issue 14; jf18b ~150 s: one-token prefills as decode
#                                            steps, issue 14; jf20 ~130 s: sampling values before the
#                                            tokens' wait, issue 14; spec9 ~70 s: batch-1
#                                            NGRAM arms, issue 18; jf16 ~200 s: forced rows off vs on,
#                                            issue 14, off since 2026-12-05's 0.844x — run only with time to spare)
#   bash benchmarks/h200_pending.sh final   (~600 s: gpu_suite a,e,g then b,f; the 64-adapter row; w4a — or as two calls,
#                                            `final suite_aeg suite_bf` then `final lora64 w4a`)
#   bash benchmarks/h200_pending.sh lora    (~200 s: issue 21's base, 1-adapter and 8-adapter rows at 1,000 requests, one engine)
# Names after the part run only those runs of it (e.g. `ab jf14 w4f`): the one call that tried `ab` whole (21:40 on
# 2026-12-04) lost the machine with nothing returned, so a later session may prefer two shorter calls.
set -u
# The device runs the tree uninstalled: make `import radixlm` resolve to this checkout (the package maps to the root).
python3 -c "import radixlm" 2>/dev/null || { mkdir -p /tmp/radixlm-link; ln -sfn "$PWD" /tmp/radixlm-link/radixlm
  export PYTHONPATH=/tmp/radixlm-link${PYTHONPATH:+:$PYTHONPATH}; }
OUT=${OUT:-benchmarks/results/h200_pending}
PART=${1:-}; shift || true; ONLY=" $* "
run() { local name=$1 cap=$2; shift 2
  if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then echo "=== $name skipped"; return; fi
  mkdir -p "$OUT/$name"; echo "=== $name $(date +%T) cap ${cap}s"
  timeout "$cap" bash -c "$*" > "$OUT/$name/log.txt" 2>&1; echo "rc=$? $name"; tail -25 "$OUT/$name/log.txt"; }
case "$PART" in
ab)
  # issue 18 (spec9): batch-1 NGRAM with fewer plain steps, arms short / source / shortsrc / shortsrcdeep beside the default in
  # one process -> flip the fastest arm's constants in runtime/speculative/spec_decoder.py (SHORT_MATCH_ROWS, COPY_SOURCE_ROWS,
  # SHORT_DEPTH_ROWS) if it beats the default in the repeat cell and is within -1% in the random cell (RESULTS.md, spec9)
  # issue 14 item 4 (jf18): no A/B (its host changes are on, outputs unchanged): item (f)'s
  # decode step at 256 rows op by op outside the forward, JSON vs plain, kernels and copies with device us -> says which of
  # the JSON step's ops (index copy, table gather, bitmask kernel, ...) make its +0.26 ms a step (RESULTS.md, jf18)
  run jf18 150 "python3 benchmarks/f_step_ops.py --batch 256 --out $OUT/jf18/ops.json"
  # issue 14 item 4 (jf18b): a prefill step of one sampled token a row (the JSON and same-lengths runs' first step: 127 of
  # each 128-token prompt cached) run as a decode step, an Engine per arm (constant off, on) at 64 and 256 rows -> set
  # ONE_TOKEN_PREFILL_AS_DECODE = True (runtime/prefill_as_decode.py; now None: on for the CPU only) if the JSON run's tok/s rises at both sizes with 64/64
  # and 256/256 valid and the same-lengths run's does not fall; "prefill N/N (as decode 1/1)" in the on arm's loop line
  # shows the mechanism, "step ms ... longest json/same" and the "forward launch" longest call its first steps (H100
  # 2026-12-05 off: 54.7/44.8 ms at 64 rows, 112.1/57.4 ms at 256)
  run jf18b 200 "RADIXLM_LOOP_STATS=$OUT/jf18b/loop.jsonl python3 benchmarks/gpu_suite.py --skip-check --skip-transformers --items f --f-batch 64,256 --f-state-table auto --f-skip-profile --f-wait-tables --f-flag-arms='-;RADIXLM_ONE_TOKEN_PREFILL_AS_DECODE=1' --out $OUT/jf18b/f.json"
  # issue 14 item 4 (jf20): an overlapped constrained decode step builds its sampling values before it waits for the
  # previous step's tokens (step_order.SAMPLING_BEFORE_TOKENS, on by default; outputs identical), arms default / off
  # (RADIXLM_SAMPLING_BEFORE_TOKENS=0) in one process at 64 and 256 rows -> set SAMPLING_BEFORE_TOKENS = False only if
  # the off arm's (f) same-lengths ratio is higher at both sizes; the JSON loop's "device waits" (longer where the host
  # has less work after the tokens) and "sampling tensors" show the mechanism
  run jf20 150 "RADIXLM_LOOP_STATS=$OUT/jf20/loop.jsonl python3 benchmarks/gpu_suite.py --skip-check --skip-transformers --items f --f-batch 64,256 --f-state-table auto --f-skip-profile --f-wait-tables --f-flag-arms='-;RADIXLM_SAMPLING_BEFORE_TOKENS=0' --out $OUT/jf20/f.json"
  run spec9 200 "python3 benchmarks/speculative.py --mode gpu --sets e2e --topk 1 --prompt-sets repeat,random --batches 1 --repeats 3 --new-tokens 128 --no-audit --short-ab --out $OUT/spec9/spec.json"
  # issue 14 item 4 (jf14, jf15's guess runs / closing-brace ends; jf16's candidate-only planning, cached runs, plain-first step inputs): forced rows off vs on, (f) at 64 and 256 rows -> the default of --enable-forced-rows (runtime/server_args.py)
  run jf16 200 "RADIXLM_LOOP_STATS=$OUT/jf16/loop.jsonl python3 benchmarks/gpu_suite.py --skip-check --skip-transformers --items f --f-batch 64,256 --f-state-table auto --f-skip-profile --f-wait-tables --f-forced-rows off,on --out $OUT/jf16/f.json"
  ;;
final)
  # two suite runs (the one 340-s run of 2026-12-05 on an H100 was cut after b and f: check ~40 s, b ~70 s, f ~57 s there)
  run suite_aeg 240 "python3 benchmarks/gpu_suite.py --skip-transformers --items a,e,g --out $OUT/suite_aeg/suite.json"
  run suite_bf 300 "python3 benchmarks/gpu_suite.py --skip-check --skip-transformers --items b,f --f-batch 64,256 --f-state-table auto --f-skip-profile --f-wait-tables --f-repeats 5 --out $OUT/suite_bf/suite.json"
  # issue 14's (f) alone on the defaults: one Engine, the first pair and 7 more in alternating order (~150 s)
  run f5 280 "RADIXLM_LOOP_STATS=$OUT/f5/loop.jsonl python3 benchmarks/gpu_suite.py --skip-check --skip-transformers --items f --f-batch 64,256 --f-state-table auto --f-skip-profile --f-wait-tables --f-repeats 8 --out $OUT/f5/f.json"
  # the scheduler's admission of a 256-request burst in-process (item (f)'s first step spends it: "schedule prefill" 22-43
  # ms on the H100's host vs ~9 ms on the 2-core VM): its Python functions and the device ops it launches, plain and JSON
  # (2026-12-05 14:30 on the H200: 35 ms plain / 21 ms JSON, 10 ms uncached; kv_pool.write most of it) -> then with the
  # prefixes' device writes deferred to one scatter: set prefill_admission.DEFER_ADMISSION_WRITES on if "rows whose device
  # table differs" is all 0 and the admission is faster, then check (f) / (e) on that commit
  run adm 150 "python3 benchmarks/admission_cost.py --batch 256 --out $OUT/adm/plain.json && python3 benchmarks/admission_cost.py --batch 256 --json --out $OUT/adm/json.json && RADIXLM_DEFER_ADMISSION_WRITES=1 python3 benchmarks/admission_cost.py --batch 256 --out $OUT/adm/plain_deferred.json && RADIXLM_DEFER_ADMISSION_WRITES=1 python3 benchmarks/admission_cost.py --batch 256 --json --out $OUT/adm/json_deferred.json"
  # the overlapped constrained prefill against the synchronous one, an Engine each, 6 pairs (ran twice on 2026-12-06 with
  # the flag's earlier spelling; since c52066f the overlap is the default and the synchronous arm is the flag): pool
  # with benchmarks/f_pooled.py, minding that outputs before c52066f call the synchronous arm "defaults"
  run jf22s 300 "RADIXLM_LOOP_STATS=$OUT/jf22s/loop.jsonl python3 benchmarks/gpu_suite.py --skip-check --skip-transformers --items f --f-batch 64,256 --f-state-table auto --f-skip-profile --f-wait-tables --f-repeats 6 --f-flag-arms='-;disable_overlap_constrained_prefill' --out $OUT/jf22s/f.json"
  # forced rows as repeated pairs (2026-12-06): jf16's one pair (0.844x at 256 rows, 2026-12-05) lost ~180 ms in its
  # first three steps (forward inputs' longest call 181 ms, steps of 188 / 71 / 22 ms) while its steady state took 101
  # decode steps for the same-lengths run's 106 at a median 9.37 ms against 9.65; the repeats tell a first-run cost
  # from a per-run one. Engines in turn: forced rows, defaults, forced rows (~230 s; jf22s after it on the same machine)
  # -> turn --enable-forced-rows on by default only if its pooled median ratio is above the defaults' (pooled with
  # jf21 / f5) at both sizes, outputs valid. (Ran 2026-12-06: off stays; each Engine's first forced-rows JSON run spent
  # 130-157 ms in one "forward inputs" call. Since then the step parts also split out "plan guesses", "resolve guesses",
  # "plan rides", and inside "forward inputs" "guess pick inputs" and "extra-rows inputs' copy": run it again to see
  # which holds that first call, the rest being the device operations after the copy.)
  run jf23 400 "RADIXLM_LOOP_STATS=$OUT/jf23/loop.jsonl python3 benchmarks/gpu_suite.py --skip-check --skip-transformers --items f --f-batch 64,256 --f-state-table auto --f-skip-profile --f-wait-tables --f-repeats 6 --f-flag-arms='enable_forced_rows;-;enable_forced_rows' --out $OUT/jf23/f.json"
  run lora64 118 "python3 benchmarks/lora_issue.py --requests 1000 --rows 64 --skip base_engine,decode,check --cuda-graph-max-bs 256 --progress-s 5 --loop-stats --budget-s 112 --out $OUT/lora64/lora64.json"
  run w4a 60 "python3 benchmarks/small_m_gemm_sweep.py --decode-only --decode-arms w4a16-defaults --out $OUT/w4a/w4a.json"
  ;;
lora)
  run lora1 200 "python3 benchmarks/lora_issue.py --requests 1000 --rows base,1,8 --skip base_engine,check,decode --cuda-graph-max-bs 1024 --progress-s 10 --budget-s 190 --out $OUT/lora1/lora1.json"
  ;;
*) echo "usage: $0 ab|final|lora [run names...]"; exit 2 ;;
esac
