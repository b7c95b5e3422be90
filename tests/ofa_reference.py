"""An independent, literal re-implementation of OFA's forward pass, the ground truth for mue's model.

Written from the facts of the public OFA code (OFA-Sys/OFA: models/ofa/unify_transformer.py,
unify_transformer_layer.py, unify_multihead_attention.py, resnet.py), not from mue's code: time-first
T x B x C tensors, bmm attention with the query scaled before the product, additive `attn_bias`, a float
-inf causal mask, key padding by masked_fill, per-head `c_attn` before out_proj. It reads a plain state
dict with OFA's parameter names, runs without dropout (eval), BatchNorm with running statistics.

`decomposed=True` is MuE's decomposed encoder written the OFA way: the joint stack with image and text
forbidden to attend to each other (a large negative additive mask), which is what running two streams
with tied layers computes. Padded/absent positions may differ from a stream-wise run; they are masked
out of the cross-attention, so logits do not depend on them.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F

EPS = 1e-5  # fairseq LayerNorm and BatchNorm2d default


def token_rp_buckets(bucket_size: int, max_position: int = 1024) -> torch.Tensor:
    """OFA's 1D relative-position buckets (query minus key), built for 1024 positions whatever the
    model's max positions: exact within +-(bucket_size/2 - 1), log-spaced beyond, shifted to >= 0."""
    rel = torch.arange(max_position)[:, None] - torch.arange(max_position)[None, :]
    mid = bucket_size // 2
    near = (rel > -mid) & (rel < mid)
    mag = torch.where(near, torch.tensor(mid - 1), rel.abs())
    logb = (torch.ceil(torch.log(mag / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid).int()
    return torch.where(mag <= mid, rel, logb * torch.sign(rel)).long() + bucket_size - 1


def image_rp_buckets(bucket_size: int) -> torch.Tensor:
    """OFA's 2D relative-position buckets over position ids (0 = special, 1.. = row*bucket+col+1)."""
    n_dist = (2 * bucket_size - 1) ** 2 + 3
    grid = torch.stack(torch.meshgrid(torch.arange(bucket_size), torch.arange(bucket_size), indexing="ij")).flatten(1)
    rel = grid[:, :, None] - grid[:, None, :] + bucket_size - 1  # 2 x N x N
    table = torch.zeros(bucket_size**2 + 1, bucket_size**2 + 1, dtype=torch.long)
    table[1:, 1:] = rel[0] * (2 * bucket_size - 1) + rel[1]
    table[0, :] = n_dist - 3
    table[:, 0] = n_dist - 2
    table[0, 0] = n_dist - 1
    return table


class OFAReference:
    def __init__(self, state_dict: Dict[str, torch.Tensor], heads: int, padding_idx: int = 1,
                 token_bucket_size: int = 256, image_bucket_size: int = 42, attn_scale_factor: float = 2.0):
        self.sd = {k: v.detach() for k, v in state_dict.items()}
        self.heads, self.pad, self.image_bucket = heads, padding_idx, image_bucket_size
        self.dim = self.sd["encoder.embed_tokens.weight"].size(1)
        self.head_dim = self.dim // heads
        self.scaling = (self.head_dim * attn_scale_factor) ** -0.5  # attention and position bias alike
        self.token_buckets = token_rp_buckets(token_bucket_size)
        self.image_buckets = image_rp_buckets(image_bucket_size)
        self.enc_layers = len({k.split(".")[2] for k in self.sd if k.startswith("encoder.layers.")})
        self.dec_layers = len({k.split(".")[2] for k in self.sd if k.startswith("decoder.layers.")})

    # ---- primitives ---------------------------------------------------------------------------
    def ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.sd[name + ".weight"], self.sd[name + ".bias"], EPS)

    def linear(self, x, name):
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    def bn(self, x, name):
        sd = self.sd
        return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], False, 0.0, EPS)

    def attention(self, name, query, key, key_padding_mask=None, attn_mask=None, attn_bias=None):
        """OFA MultiheadAttention, T x B x C; attn_bias [B*H, Tq, Tk]; attn_mask [Tq, Tk] additive."""
        tq, bsz, dim = query.shape
        q = self.linear(query, name + ".q_proj") * self.scaling
        k, v = self.linear(key, name + ".k_proj"), self.linear(key, name + ".v_proj")
        q = q.reshape(tq, bsz * self.heads, self.head_dim).transpose(0, 1)
        k = k.reshape(-1, bsz * self.heads, self.head_dim).transpose(0, 1)
        v = v.reshape(-1, bsz * self.heads, self.head_dim).transpose(0, 1)
        tk = k.size(1)
        w = torch.bmm(q, k.transpose(1, 2))
        if attn_bias is not None:
            w = w + attn_bias
        if attn_mask is not None:
            w = w + attn_mask[None]
        if key_padding_mask is not None:
            w = w.view(bsz, self.heads, tq, tk).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            w = w.view(bsz * self.heads, tq, tk)
        out = torch.bmm(F.softmax(w, dim=-1), v).transpose(0, 1).reshape(tq, bsz, dim)
        out = torch.einsum("tbhd,h->tbhd", out.view(tq, bsz, self.heads, self.head_dim), self.sd[name + ".c_attn"])
        return self.linear(out.reshape(tq, bsz, dim), name + ".out_proj")

    def ffn(self, x, name):
        h = F.gelu(self.linear(self.ln(x, name + ".final_layer_norm"), name + ".fc1"))
        return x + self.linear(self.ln(h, name + ".ffn_layernorm"), name + ".fc2")

    # ---- image stem ---------------------------------------------------------------------------
    def resnet(self, images):
        """torchvision-style ResNet V1.5 (stride in the 3x3 conv), stages 1-3 only."""
        p = "encoder.embed_images."
        x = F.conv2d(images, self.sd[p + "conv1.weight"], stride=2, padding=3)
        x = F.max_pool2d(F.relu(self.bn(x, p + "bn1")), 3, 2, 1)
        for stage in (1, 2, 3):
            blocks = sorted({int(k.split(".")[3]) for k in self.sd if k.startswith(f"{p}layer{stage}.")})
            for b in blocks:
                q = f"{p}layer{stage}.{b}."
                stride = 2 if stage > 1 and b == 0 else 1
                out = F.relu(self.bn(F.conv2d(x, self.sd[q + "conv1.weight"]), q + "bn1"))
                out = F.relu(self.bn(F.conv2d(out, self.sd[q + "conv2.weight"], stride=stride, padding=1), q + "bn2"))
                out = self.bn(F.conv2d(out, self.sd[q + "conv3.weight"]), q + "bn3")
                if q + "downsample.0.weight" in self.sd:
                    x = self.bn(F.conv2d(x, self.sd[q + "downsample.0.weight"], stride=stride), q + "downsample.1")
                x = F.relu(x + out)
        return x

    def abs_bias(self, pos, q_name, k_name, pos_k=None):
        """Per-head bias from (normed) position embeddings [B, T, C] -> [B, H, Tq, Tk]."""
        pos_k = pos if pos_k is None else pos_k
        bsz = pos.size(0)
        q = self.linear(pos, q_name).view(bsz, pos.size(1), self.heads, -1).transpose(1, 2) * self.scaling
        k = self.linear(pos_k, k_name).view(bsz, pos_k.size(1), self.heads, -1).transpose(1, 2)
        return torch.matmul(q, k.transpose(2, 3))

    # ---- encoder ------------------------------------------------------------------------------
    def encoder(self, src_tokens, patch_images=None, patch_masks=None, decomposed=False, num_layers=None):
        """Returns (x T x B x C after the final LayerNorm, padding B x T, normed positions B x T x C)."""
        sd, bsz, n_text = self.sd, src_tokens.size(0), src_tokens.size(1)
        padding = src_tokens.eq(self.pad)
        pos = sd["encoder.embed_positions.weight"][torch.arange(n_text)][None].expand(bsz, -1, -1)
        x = sd["encoder.embed_tokens.weight"][src_tokens] + sd["encoder.type_embedding.weight"][0]
        x = self.ln(x, "encoder.layernorm_embedding")
        pos = self.ln(pos, "encoder.pos_ln")
        n_image = 0
        if patch_images is not None:
            feats = self.resnet(patch_images)
            h, w = feats.shape[-2:]
            n_image = h * w
            ids = (torch.arange(w)[None, :] + torch.arange(h)[:, None] * self.image_bucket + 1).reshape(-1)
            ids = ids[None].expand(bsz, -1)
            img_pad = torch.zeros(bsz, n_image, dtype=torch.bool)
            if patch_masks is not None:
                img_pad[~patch_masks] = True
            img = self.linear(feats.flatten(2).transpose(1, 2), "encoder.image_proj") + sd["encoder.type_embedding.weight"][1]
            img = self.ln(img, "encoder.patch_layernorm_embedding")
            x = torch.cat([img, x], 1)
            padding = torch.cat([img_pad, padding], 1)
            pos = torch.cat([self.ln(sd["encoder.embed_image_positions.weight"][ids], "encoder.image_pos_ln"), pos], 1)
        has_pads = bool(padding.any())
        if has_pads:
            x = x * (1 - padding[..., None].type_as(x))
        x = x.transpose(0, 1)
        abs_bias = self.abs_bias(pos, "encoder.pos_q_linear", "encoder.pos_k_linear")
        total = x.size(0)
        mask = None
        if decomposed and n_image:
            is_image = torch.arange(total) < n_image
            mask = torch.zeros(total, total).masked_fill(is_image[:, None] != is_image[None, :], -1e9)
        for i in range(self.enc_layers if num_layers is None else num_layers):
            name = f"encoder.layers.{i}"
            bias = abs_bias.clone()
            rel = sd[f"encoder.token_rel_pos_table_list.{i}.weight"][self.token_buckets[:n_text, :n_text]]
            bias[:, :, -n_text:, -n_text:] += rel.permute(2, 0, 1)[None]
            if n_image:
                buckets = self.image_buckets[ids[:, :, None], ids[:, None, :]]  # B x P x P
                rel = sd[f"encoder.image_rel_pos_table_list.{i}.weight"][buckets]
                bias[:, :, :n_image, :n_image] += rel.permute(0, 3, 1, 2)
            h = self.attention(name + ".self_attn", self.ln(x, name + ".self_attn_layer_norm"),
                               self.ln(x, name + ".self_attn_layer_norm"), padding if has_pads else None, mask,
                               bias.reshape(-1, total, total))
            x = x + self.ln(h, name + ".attn_ln")
            x = self.ffn(x, name)
        return self.ln(x, "encoder.layer_norm"), padding, pos

    # ---- decoder ------------------------------------------------------------------------------
    def decoder(self, prev_output_tokens, enc, enc_padding, enc_pos, features_only=False):
        sd = self.sd
        bsz, tgt_len = prev_output_tokens.shape
        tgt_pos = self.ln(sd["decoder.embed_positions.weight"][torch.arange(tgt_len)][None].expand(bsz, -1, -1),
                          "decoder.pos_ln")
        self_abs = self.abs_bias(tgt_pos, "decoder.self_pos_q_linear", "decoder.self_pos_k_linear")
        cross = self.abs_bias(tgt_pos, "decoder.cross_pos_q_linear", "decoder.cross_pos_k_linear", enc_pos)
        cross = cross.reshape(-1, tgt_len, enc.size(0))
        x = self.ln(sd["decoder.embed_tokens.weight"][prev_output_tokens], "decoder.layernorm_embedding").transpose(0, 1)
        self_pad = prev_output_tokens.eq(self.pad)
        self_pad = self_pad if self_pad.any() else None
        future = torch.triu(torch.full((tgt_len, tgt_len), float("-inf")), 1)
        for i in range(self.dec_layers):
            name = f"decoder.layers.{i}"
            rel = sd[f"decoder.token_rel_pos_table_list.{i}.weight"][self.token_buckets[:tgt_len, :tgt_len]]
            bias = (self_abs + rel.permute(2, 0, 1)[None]).reshape(-1, tgt_len, tgt_len)
            y = self.ln(x, name + ".self_attn_layer_norm")
            x = x + self.ln(self.attention(name + ".self_attn", y, y, self_pad, future, bias), name + ".self_attn_ln")
            y = self.ln(x, name + ".encoder_attn_layer_norm")
            h = self.attention(name + ".encoder_attn", y, enc, enc_padding, None, cross)
            x = x + self.ln(h, name + ".cross_attn_ln")
            x = self.ffn(x, name)
        x = self.ln(x, "decoder.layer_norm").transpose(0, 1)
        return x if features_only else F.linear(x, sd["decoder.output_projection.weight"])

    @torch.no_grad()
    def __call__(self, src_tokens, prev_output_tokens, patch_images=None, patch_masks=None, decomposed=False):
        """Logits [B, T, V] for teacher-forced `prev_output_tokens`."""
        enc, padding, pos = self.encoder(src_tokens, patch_images, patch_masks, decomposed)
        return self.decoder(prev_output_tokens, enc, padding, pos)


# ---- shared test helpers (kept here: the tests' only helper module) ----------------------------------
def tiny_dictionary(n_words: int = 40):
    """A fairseq Dictionary with the 4 specials (<s>=0, <pad>=1, </s>=2, <unk>=3) and `n_words` words."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return d


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic a random, O(1)-effect value (LayerNorm gains and
    biases, per-head gains, relative-position tables, type embedding included), so that each of them
    changes the output and a reimplementation that skips one is caught."""
    g = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=g)

    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            module.weight.copy_(1 + 0.2 * randn(module.weight))
            module.bias.copy_(0.2 * randn(module.bias))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * randn(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(randn(module.weight) / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.copy_(0.1 * randn(module.bias))
        elif isinstance(module, torch.nn.Embedding):
            module.weight.copy_(0.5 * randn(module.weight))
    for name, param in model.named_parameters():
        if name.endswith("c_attn"):
            param.copy_(1 + 0.5 * randn(param))
    return model


def exits(model, settings):
    """`with exits(model, ExitSettings(...)) as settings:` the model exits under `settings` for the block
    (mue.exiting.session.exit_session; `settings.trace` records what ran)."""
    from mue.exiting.session import exit_session

    return exit_session(model, settings)
