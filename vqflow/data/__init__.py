"""Datasets: readers per layout (sources.py), the synthetic default, image loading and the manifest. The package
imports none of them: a stage runs only the modules it imports (a reader the run does not use is not its code)."""
