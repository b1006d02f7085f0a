"""The stages of ``benchmarks/gpu_report.py``, one module each, run through ``benchmarks/gpu_stages.py``
(each stage its own process, appending result rows to ``--rows``). ``common`` holds what they share (device,
sizes, data, compile switch, timing, rows), ``variants`` the whole-step variants the step stages time."""
