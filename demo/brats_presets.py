# Copyright (c) MONAI generative bundles contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Config overrides that shrink brats_ldm2d's networks, for the tests and the benchmark's smoke run."""

TINY_AUTOENCODER = {
    "autoencoder_def#channels": [8, 16, 16],
    "autoencoder_def#norm_num_groups": 8,
    "autoencoder_def#num_res_blocks": 1,
}
TINY_DISCRIMINATOR = {"discriminator_def#channels": 8}
TINY_DIFFUSION = {
    "network_def#channels": [8, 16],
    "network_def#attention_levels": [False, True],
    "network_def#num_head_channels": [0, 8],
    "network_def#norm_num_groups": 8,
    "network_def#num_res_blocks": 1,
}

# the demo's small networks (demo/run_demo.py): big enough to learn the synthetic anatomy in about a minute
DEMO_PATCH = 64
DEMO_AUTOENCODER = {
    "autoencoder_def#channels": [16, 32, 32],
    "autoencoder_def#norm_num_groups": 8,
    "autoencoder_def#num_res_blocks": 1,
}
DEMO_DIFFUSION = {
    "network_def#channels": [16, 32, 64],
    "network_def#attention_levels": [False, True, True],
    "network_def#num_head_channels": [0, 16, 16],
    "network_def#norm_num_groups": 8,
    "network_def#num_res_blocks": 1,
}
