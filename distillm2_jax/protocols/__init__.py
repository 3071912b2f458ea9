"""The paper's evaluation protocols (docs/evaluation.md), on files on disk, nothing downloaded.

Modules (one job each): `judge` (the pairwise judge protocol: prompt, verdicts, both orders, win
rate and position bias), `judge_backends` (a local model or an OpenAI-compatible endpoint as the
judge), `math_eval` (math pass@1 with math-verify), `code` (HumanEval/MBPP programs and pass@k),
`sandbox` + `sandbox_child` (running candidate programs with limits), `report` (one report per
student, JSON and markdown), `arguments` (the command-line flags), `fields` (reading the inputs).
"""
