"""The router process: frontends, model repository, schedulers, worker supervision.

Never imports ``workers`` or any ML runtime.
"""
