//! `ouroc_kv_copy`: the one hand-written kernel, used by the runtime's
//! device rather than by a Program kernel: copies, for each of `grid.x`
//! heads and for K (`ctaid.y` 0) and V (1), `words` 32-bit words from
//! `src + head * src_head + offset` to `dst + head * dst_head + offset`.
//! It fills the KV slots of skipped loop steps and moves the stores when
//! their capacity grows. Launch: grid `[heads, 2, 1]`, block
//! `KV_COPY_BLOCK`, no shared memory; parameters in the order of the
//! entry (`src_k, src_v, dst_k, dst_v: u64`, `src_head, dst_head, offset:
//! u64` in bytes, `words: u32`).

/// The module text (PTX ISA 8.0, sm_80).
pub const KV_COPY_PTX: &str = r#"
.version 8.0
.target sm_80
.address_size 64

.visible .entry ouroc_kv_copy(
	.param .u64 src_k,
	.param .u64 src_v,
	.param .u64 dst_k,
	.param .u64 dst_v,
	.param .u64 src_head,
	.param .u64 dst_head,
	.param .u64 offset,
	.param .u32 words
)
.maxntid 256, 1, 1
{
	.reg .pred %p<3>;
	.reg .b32 %r<8>;
	.reg .b64 %rd<16>;
	ld.param.u32 %r1, [words];
	mov.u32 %r2, %ctaid.y;
	setp.eq.u32 %p1, %r2, 0;
	ld.param.u64 %rd1, [src_k];
	ld.param.u64 %rd2, [src_v];
	selp.b64 %rd1, %rd1, %rd2, %p1;
	ld.param.u64 %rd3, [dst_k];
	ld.param.u64 %rd4, [dst_v];
	selp.b64 %rd3, %rd3, %rd4, %p1;
	cvta.to.global.u64 %rd1, %rd1;
	cvta.to.global.u64 %rd3, %rd3;
	mov.u32 %r3, %ctaid.x;
	cvt.u64.u32 %rd5, %r3;
	ld.param.u64 %rd6, [src_head];
	ld.param.u64 %rd7, [dst_head];
	ld.param.u64 %rd8, [offset];
	mul.lo.u64 %rd9, %rd5, %rd6;
	add.s64 %rd9, %rd9, %rd8;
	add.s64 %rd1, %rd1, %rd9;
	mul.lo.u64 %rd10, %rd5, %rd7;
	add.s64 %rd10, %rd10, %rd8;
	add.s64 %rd3, %rd3, %rd10;
	mov.u32 %r4, %tid.x;
COPY:
	setp.ge.u32 %p2, %r4, %r1;
	@%p2 bra DONE;
	mul.wide.u32 %rd11, %r4, 4;
	add.s64 %rd12, %rd1, %rd11;
	ld.global.b32 %r5, [%rd12];
	add.s64 %rd13, %rd3, %rd11;
	st.global.b32 [%rd13], %r5;
	add.u32 %r4, %r4, 256;
	bra COPY;
DONE:
	ret;
}
"#;
