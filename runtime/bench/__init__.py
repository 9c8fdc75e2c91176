"""`radixlm bench serving|offline|constrained`: the benchmarks a user runs from the installed package.

Each prints an SGLang-style summary table and can write its figures as JSON (--output-file)."""
