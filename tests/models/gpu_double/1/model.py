"""2 * INPUT0 on the GPU through DLPack (PyTorch); reports whether INPUT0 came in GPU memory."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            on_gpu = not tensor.is_cpu()
            x = dlpack.from_dlpack(tensor.to_dlpack())
            y = (x.cuda() * 2).contiguous()
            out = pb_utils.Tensor.from_dlpack("OUTPUT0", dlpack.to_dlpack(y))
            flag = pb_utils.Tensor("INPUT_ON_GPU", np.array([on_gpu], dtype=np.bool_))
            responses.append(pb_utils.InferenceResponse([out, flag]))
        torch.cuda.synchronize()
        return responses
