//! Adapter discovery and selection, and the limits profiles.
//!
//! `--device` (or `POCKETTUNE_DEVICE`) picks an adapter by index, by a substring of its name, or
//! by type (`discrete`, `integrated`, `virtual`, `software`). With nothing given the first
//! discrete, then integrated, then any other adapter wins. Software adapters (lavapipe) are used
//! only when nothing else exists, or when asked for.
//!
//! The `mobile` profile requests `wgpu::Limits::downlevel_defaults()` from the device, so any
//! kernel that needs more than a phone GPU offers (five storage buffers, a 200 MiB binding, more
//! than 16 KiB of workgroup memory) fails validation here too, not first on a phone.

use crate::error::{Error, Result};
use serde::Serialize;
use std::fmt;

/// Environment variable read when `--device` is not given.
pub const DEVICE_ENV: &str = "POCKETTUNE_DEVICE";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// `wgpu::Limits::downlevel_defaults()`: 4 storage buffers per stage, 128 MiB bindings,
    /// 256 MiB buffers, 16352 bytes of workgroup memory, 256 invocations per workgroup.
    #[default]
    Mobile,
    /// Everything the adapter offers.
    Adapter,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Mobile => "mobile",
            Profile::Adapter => "adapter",
        })
    }
}

impl Profile {
    pub fn limits(self, adapter: &wgpu::Adapter) -> wgpu::Limits {
        match self {
            Profile::Mobile => wgpu::Limits::downlevel_defaults(),
            Profile::Adapter => adapter.limits(),
        }
    }
}

/// What `info` prints about one adapter.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_size: [u32; 2],
    pub timestamp_query: bool,
    pub cooperative_matrix: bool,
}

impl AdapterSummary {
    fn new(index: usize, adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        let f = adapter.features();
        AdapterSummary {
            index,
            name: info.name.clone(),
            backend: format!("{:?}", info.backend).to_lowercase(),
            device_type: type_name(info.device_type).to_string(),
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            shader_f16: f.contains(wgpu::Features::SHADER_F16),
            subgroups: f.contains(wgpu::Features::SUBGROUP),
            subgroup_size: [info.subgroup_min_size, info.subgroup_max_size],
            timestamp_query: f.contains(wgpu::Features::TIMESTAMP_QUERY),
            cooperative_matrix: f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        }
    }
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] {} ({}, {}, driver {} {})",
            self.index, self.name, self.device_type, self.backend, self.driver, self.driver_info
        )
    }
}

fn type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "software",
        wgpu::DeviceType::Other => "other",
    }
}

fn preference(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

pub fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    // Compute only: Vulkan everywhere (Android, Linux, Windows), Metal on Apple, DX12 as a
    // fallback on Windows. GL has no storage buffers worth the name on phones.
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    }
    #[cfg(target_os = "linux")]
    if desc.backends.contains(wgpu::Backends::VULKAN) && !desc.backends.contains(wgpu::Backends::GL) {
        if let Some(instance) = vulkan_without_window_system(&desc) {
            return instance;
        }
    }
    wgpu::Instance::new(desc)
}

/// A Vulkan instance without the X11 and Wayland surface extensions wgpu enables by default:
/// we never present to a screen, and with them enabled Mesa's device-select layer connects to
/// the Wayland and X servers each time GPUs are listed, which on a headless machine printed
/// "error: XDG_RUNTIME_DIR is invalid or not set in the environment" (twice per listing)
/// before any output of ours. wgpu-hal 30 uses these extensions only to create surfaces, and
/// checks that they are enabled before it does. None when Vulkan cannot be loaded: then the
/// ordinary path runs and reports it.
#[cfg(target_os = "linux")]
fn vulkan_without_window_system(desc: &wgpu::InstanceDescriptor) -> Option<wgpu::Instance> {
    use wgpu::hal::vulkan;
    let window_system = [c"VK_KHR_xlib_surface", c"VK_KHR_xcb_surface", c"VK_KHR_wayland_surface"];
    let drop_window_system: Box<vulkan::CreateInstanceCallback> =
        Box::new(move |args| args.extensions.retain(|e| !window_system.contains(e)));
    let hal_desc = wgpu::hal::InstanceDescriptor {
        name: "pockettune",
        flags: desc.flags,
        memory_budget_thresholds: desc.memory_budget_thresholds,
        backend_options: desc.backend_options.clone(),
        telemetry: None,
        display: None,
    };
    // SAFETY: the callback only leaves out surface extensions, which wgpu-hal checks for before
    // each use (surface creation); it turns no feature off and adds nothing.
    let hal = unsafe { vulkan::Instance::init_with_callback(&hal_desc, Some(drop_window_system)) }.ok()?;
    // SAFETY: `hal` was just created from a valid descriptor and is handed over whole.
    Some(unsafe { wgpu::Instance::from_hal::<wgpu::hal::api::Vulkan>(hal) })
}

/// Every adapter the instance reports, in the order `--device N` indexes them.
pub fn enumerate(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    // Vulkan first so that indices stay stable when a driver also shows up through GL.
    adapters.sort_by_key(|a| (a.get_info().backend != wgpu::Backend::Vulkan) as u8);
    adapters
}

pub fn summaries(adapters: &[wgpu::Adapter]) -> Vec<AdapterSummary> {
    adapters.iter().enumerate().map(|(i, a)| AdapterSummary::new(i, a)).collect()
}

/// Pick one adapter by the `--device` spec (index, type, or name substring, case-insensitive).
pub fn select(adapters: &[wgpu::Adapter], spec: Option<&str>) -> Result<(usize, AdapterSummary)> {
    if adapters.is_empty() {
        return Err(Error::NoAdapter { backends: "Vulkan, Metal, DX12".into() });
    }
    let summaries = summaries(adapters);
    let spec = spec.map(str::trim).filter(|s| !s.is_empty() && *s != "auto" && *s != "gpu");
    let chosen = match spec {
        None => (0..adapters.len())
            .min_by_key(|&i| (preference(adapters[i].get_info().device_type), i))
            .expect("adapters is not empty"),
        Some(s) => {
            let lower = s.to_lowercase();
            let by_index = s.parse::<usize>().ok().filter(|&i| i < adapters.len());
            let by_type = || summaries.iter().position(|a| a.device_type == lower);
            let by_name = || summaries.iter().position(|a| a.name.to_lowercase().contains(&lower));
            match by_index.or_else(by_type).or_else(by_name) {
                Some(i) => i,
                None => {
                    let found = summaries.iter().map(|a| format!("  {a}")).collect::<Vec<_>>();
                    return Err(Error::DeviceNotFound { spec: s.to_string(), found: found.join("\n") });
                }
            }
        }
    };
    Ok((chosen, summaries[chosen].clone()))
}

/// The limits `info` prints, as (name, value) pairs.
pub fn limit_rows(l: &wgpu::Limits) -> Vec<(&'static str, u64)> {
    vec![
        ("max_storage_buffers_per_shader_stage", l.max_storage_buffers_per_shader_stage as u64),
        ("max_storage_buffer_binding_size", l.max_storage_buffer_binding_size),
        ("max_buffer_size", l.max_buffer_size),
        ("max_uniform_buffer_binding_size", l.max_uniform_buffer_binding_size),
        ("max_compute_workgroup_storage_size", l.max_compute_workgroup_storage_size as u64),
        ("max_compute_invocations_per_workgroup", l.max_compute_invocations_per_workgroup as u64),
        ("max_compute_workgroup_size_x", l.max_compute_workgroup_size_x as u64),
        ("max_compute_workgroups_per_dimension", l.max_compute_workgroups_per_dimension as u64),
        ("min_storage_buffer_offset_alignment", l.min_storage_buffer_offset_alignment as u64),
    ]
}
