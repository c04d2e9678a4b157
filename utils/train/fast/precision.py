"""The dtype the fused kernels compute in."""
import torch


def compute_dtype(device, default):
    """The dtype a layer computes in: autocast's when it is on for the device, else `default`."""
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else default
