"""Suite-wide test order: the slow end-to-end tests start first.

With `pytest -n 2` the workers take tests in collection order; the multi-process and
end-to-end runs (marked `slow`) at the end of the collection otherwise leave one worker busy
while the other idles. Starting them first lets the short tests fill in around them.
"""


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
