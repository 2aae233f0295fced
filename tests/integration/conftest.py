def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts real processes (workers, nginx, the scripts)")
