# Package marker so that `from optim.test_lrscheduler import ...` in pytorch_test/test_optim.py
# resolves, as in PyTorch's own test/ directory. NOT a PyTorch file (written for this harness).
