"""The parts I-MMSeg adds to TransUNet (method.md): CMFE, CFM, dynamic class heads, fusion, contrast projections.

Shapes: B batch, M modalities, K classes, Dt text dimension, C channels, N = h * w
bottleneck positions. Modules that act on all modalities take and return lists
ordered like ``MODALITIES``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


OUTPUT_ACTIVATIONS = {
    "none": nn.Identity,
    "sigmoid": nn.Sigmoid,
    "gelu_sigmoid": lambda: nn.Sequential(nn.GELU(), nn.Sigmoid()),  # the released review code's MLP ending
}


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, then the output activation ``output`` (a key of OUTPUT_ACTIVATIONS) and dropout."""

    def __init__(self, in_features, hidden_features, out_features, output="none", dropout=0.0):
        super().__init__()
        if output not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"unknown MLP output {output!r}; expected one of {sorted(OUTPUT_ACTIVATIONS)}")
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.out_act = OUTPUT_ACTIVATIONS[output]()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.out_act(self.fc2(self.act(self.fc1(x)))))


class ConcatFusion(nn.Sequential):
    """Concatenate along channels, then 1x1 conv, BatchNorm, ReLU (method.md's fusion block)."""

    def __init__(self, in_channels, out_channels):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, inputs):
        return super().forward(torch.cat(inputs, dim=1))


class CrossModalFeatureEnhancement(nn.Module):
    """CMFE: prior-guided spatial gates, cross-modal affinities, and a fusion per modality.

    For modality m with bottleneck F_m (B, C, h, w) and intensity prior T_m:
    w_m = sigmoid-MLP([ReLU(Linear(T_m)), Conv1x1(GAP(F_m))]) gives one weight per
    position; M_m = F_m * w_m; for each other modality o, A = softmax_j |cos(M_m[:, i],
    M_o[:, j])| and E_{m<-o} = M_m A^T; F^_m = ReLU(BN(Conv1x1([F_m, E_{m<-a}, E_{m<-b}]))).
    ``cfg`` (config.cmfe) gives the widths and the gate MLP's output activation and dropout.
    """

    def __init__(self, channels, num_positions, text_dim, cfg, num_modalities=3):
        super().__init__()
        self.num_positions = num_positions
        self.prior_proj = nn.Sequential(nn.Linear(text_dim, cfg.prior_dim), nn.ReLU(inplace=True))
        self.visual_proj = nn.ModuleList(nn.Conv2d(channels, cfg.prior_dim, kernel_size=1)
                                         for _ in range(num_modalities))
        self.gates = nn.ModuleList(Mlp(2 * cfg.prior_dim, cfg.gate_hidden, num_positions, cfg.gate_output,
                                       cfg.gate_dropout)
                                   for _ in range(num_modalities))
        self.fuse = nn.ModuleList(ConcatFusion(num_modalities * channels, channels) for _ in range(num_modalities))

    def forward(self, features, intensity_priors):
        batch, channels, height, width = features[0].shape
        if height * width != self.num_positions:
            raise ValueError(f"CMFE was built for {self.num_positions} bottleneck positions, got {height}x{width}: "
                             "run the model at the img_size it was built with")
        priors = self.prior_proj(intensity_priors)
        masked = []
        for m, feature in enumerate(features):
            visual = self.visual_proj[m](feature.mean(dim=(2, 3), keepdim=True)).flatten(1)
            gate = self.gates[m](torch.cat([priors[m].expand(batch, -1), visual], dim=1))
            masked.append(feature.flatten(2) * gate.unsqueeze(1))
        unit = [F.normalize(x, dim=1, eps=1e-8) for x in masked]
        enhanced = []
        for m, feature in enumerate(features):
            parts = [feature]
            for o in range(len(features)):
                if o != m:
                    affinity = torch.bmm(unit[m].transpose(1, 2), unit[o]).abs().softmax(dim=-1)
                    parts.append(torch.bmm(masked[m], affinity.transpose(1, 2)).view_as(feature))
            enhanced.append(self.fuse[m](parts))
        return enhanced


class CBAM(nn.Module):
    """Channel attention (shared MLP on average and max pools), then 7x7 spatial attention."""

    def __init__(self, channels, reduction=16, kernel_size=7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                         nn.Linear(hidden, channels, bias=False))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        pooled = self.channel_mlp(x.mean(dim=(2, 3))) + self.channel_mlp(x.amax(dim=(2, 3)))
        x = x * torch.sigmoid(pooled)[:, :, None, None]
        spatial = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(spatial))


class ClassFeatureModulation(nn.Module):
    """CFM: per-sample, per-modality FiLM of the class features Q.

    r_m = MLP(T_m); v_m = GAP(Conv1x1(CBAM(F^_m))); s_m = MLP([r_m, v_m]);
    (gamma_k, beta_k) = Linear(s_m); Q_m[k] = Q[k] * (1 + gamma_k) + beta_k.
    Each sample is modulated by its own features, so a slice's output never
    depends on the other slices of its batch, unless ``cfg.average_visual_over_batch``
    (the released review code) replaces v_m by its mean over the batch.
    """

    def __init__(self, channels, text_dim, num_classes, cfg, num_modalities=3):
        super().__init__()
        self.num_classes = num_classes
        self.average_visual_over_batch = cfg.average_visual_over_batch
        self.prior_mlp = Mlp(text_dim, cfg.prior_hidden, cfg.prior_dim, cfg.mlp_output, cfg.mlp_dropout)
        self.visual = nn.ModuleList(
            nn.Sequential(CBAM(channels, cfg.cbam_reduction), nn.Conv2d(channels, cfg.visual_dim, 1, bias=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            for _ in range(num_modalities))
        self.style = nn.ModuleList(Mlp(cfg.prior_dim + cfg.visual_dim, cfg.style_hidden, cfg.style_dim,
                                       cfg.mlp_output, cfg.mlp_dropout)
                                   for _ in range(num_modalities))
        self.film = nn.ModuleList(nn.Linear(cfg.style_dim, 2 * num_classes) for _ in range(num_modalities))

    def forward(self, features, intensity_priors, class_features):
        """features: M x (B, C, h, w); class_features Q: (K, D) -> M x (B, K, D)."""
        priors = self.prior_mlp(intensity_priors)
        modulated = []
        for m, feature in enumerate(features):
            visual = self.visual[m](feature)
            if self.average_visual_over_batch:
                visual = visual.mean(dim=0, keepdim=True).expand_as(visual)
            style = self.style[m](torch.cat([priors[m].expand(feature.shape[0], -1), visual], dim=1))
            gamma, beta = self.film[m](style).view(-1, self.num_classes, 2, 1).unbind(dim=2)
            modulated.append(class_features * (1 + gamma) + beta)
        return modulated


class DynamicClassHead(nn.Module):
    """Class-conditioned dynamic head.

    A context z (mean of GN-ReLU-GAP-1x1 projections of the skips) and each class
    feature Q[k] drive a controller that emits the parameters of a tiny head
    (1x1 conv c->c, ReLU, 1x1 conv c->1) applied to GN-ReLU-1x1(decoder output).
    The K heads of all B samples run at once as batched matrix products.
    """

    def __init__(self, skip_channels, decoder_channels, class_dim, context_dim, channels=4, norm_groups=4):
        super().__init__()
        self.channels = channels
        self.context = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(norm_groups, c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                          nn.Conv2d(c, context_dim, kernel_size=1), nn.Flatten(1))
            for c in skip_channels)
        self.num_params = channels * channels + channels + channels + 1
        self.controller = nn.Linear(context_dim + class_dim, self.num_params)
        self.precls = nn.Sequential(nn.GroupNorm(norm_groups, decoder_channels), nn.ReLU(inplace=True),
                                    nn.Conv2d(decoder_channels, channels, kernel_size=1))

    def forward(self, skips, class_features, decoder_output):
        """skips: list of (B, C_s, h_s, w_s); class_features: (K, D) or (B, K, D); -> logits (B, K, H, W)."""
        context = torch.stack([proj(s) for proj, s in zip(self.context, skips)]).mean(dim=0)
        batch = context.shape[0]
        class_features = class_features.expand(batch, -1, -1)
        num_classes = class_features.shape[1]
        params = self.controller(torch.cat([context[:, None].expand(-1, num_classes, -1), class_features], dim=-1))
        c = self.channels
        w1, b1, w2, b2 = params.split([c * c, c, c, 1], dim=-1)
        x = self.precls(decoder_output)
        height, width = x.shape[-2:]
        hidden = torch.bmm(w1.reshape(batch, num_classes * c, c), x.flatten(2))
        hidden = F.relu(hidden + b1.reshape(batch, num_classes * c, 1))
        hidden = hidden.view(batch * num_classes, c, height * width)
        logits = torch.bmm(w2.reshape(batch * num_classes, 1, c), hidden).view(batch, num_classes, height * width)
        return (logits + b2).view(batch, num_classes, height, width)


class ContrastProjection(nn.Module):
    """Per-scale 1x1 conv - InstanceNorm - ReLU - 1x1 conv projections of the skip features."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1), nn.InstanceNorm2d(cout), nn.ReLU(inplace=True),
                          nn.Conv2d(cout, cout, kernel_size=1))
            for cin, cout in zip(in_channels, out_channels))

    def forward(self, features):
        return tuple(proj(f) for proj, f in zip(self.projections, features))
