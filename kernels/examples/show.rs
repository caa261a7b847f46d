//! Print the Program of a checkpoint: `cargo run -p ouroc-kernels --example show -- CKPT POLICY [json] [raw]`
//! (`raw`: the imported graph, without the pipeline; `json`: the serialised form).
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ckpt = ouroc_models::Checkpoint::open(std::path::Path::new(&args[1])).unwrap();
    let opts = ouroc_models::BuildOptions {
        dtype: ouroc_ir::DType::F32,
        policy: ouroc_ir::ExitPolicy::parse(&args[2]).unwrap(),
        loops: None,
        unrolled: false,
    };
    let g = ouroc_models::build_graph(&ckpt, &opts).unwrap();
    let compiled = if args.iter().any(|a| a == "raw") {
        ouroc_compile::compile_with(g, &ouroc_passes::PassManager::new(vec![]))
    } else {
        ouroc_compile::compile_graph(g, false)
    };
    let p = compiled.unwrap().program;
    if args.iter().any(|a| a == "json") {
        println!("{}", p.to_json());
    } else {
        print!("{p}");
    }
}
