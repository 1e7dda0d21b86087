"""Tools for tests, benchmarks and demos: a fake upstream and an in-thread server runner."""
