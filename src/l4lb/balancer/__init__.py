"""The running load balancer: listeners, admission, pools, balancing, relay."""
