"""shuttled's tests (a package so that `python3 -m tests.lab.demo` and the bench can import
the namespace lab)."""
