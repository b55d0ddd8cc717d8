"""The benchmarks' library under their command lines (myops2020.py, nnunet_myops2020.py, speed.py,
check_release_conversion.py): for the MyoPS 2020 benchmark its split, prepare, planning, run, records, statistics,
report, fit and agreement; the review release's code imported beside ours."""
