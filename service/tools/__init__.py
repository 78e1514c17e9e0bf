"""Tools that run beside the service, never inside it: the demo-data seed and the traffic
simulation (``salon-reports seed`` and ``salon-reports simulate``). The app never imports them."""
