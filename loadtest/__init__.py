"""Load testing and benchmarking of the tag service (locust run, side-by-side bench, GPU check)."""
