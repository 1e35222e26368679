"""Long-lived sandboxes: provision -> start -> exec -> stop -> deprovision, state on disk, a
detached supervisor per sandbox, the local service (`corral serve`) and crash clean-up.

The public calls live in :mod:`corral.lifecycle.api` (sync) and :mod:`corral.lifecycle.aio`.
"""
