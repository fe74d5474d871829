//! VM definitions written beside migrated disks: a libvirt domain (KVM/QEMU) and an
//! Azure Resource Manager template (managed disks created for upload plus a VM that
//! attaches them). Both carry vCPUs, memory, firmware and the disks in order.

use std::path::PathBuf;

use serde_json::json;

use crate::{Firmware, Manifest, MigrateFormat};

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            _ => o.push(c),
        }
    }
    o
}

fn vdev(i: usize) -> String {
    // vda..vdz, then vdaa.. as the kernel names them.
    let mut n = i;
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    format!("vd{}", String::from_utf8_lossy(&s))
}

/// A libvirt domain XML for the migrated disks (`files`: path and file size).
pub fn libvirt_xml(m: &Manifest, files: &[(PathBuf, u64)], format: MigrateFormat, test: bool) -> String {
    let name = if test { format!("{}-test", m.vm.name) } else { m.vm.name.clone() };
    let firmware = match m.vm.firmware {
        Firmware::Uefi => " firmware='efi'",
        Firmware::Bios => "",
    };
    let mut x = String::new();
    x.push_str("<domain type='kvm'>\n");
    x.push_str(&format!("  <name>{}</name>\n", xml_escape(&name)));
    x.push_str(&format!(
        "  <description>Migrated by tern from point {} ({})</description>\n",
        xml_escape(&m.point_id),
        xml_escape(&m.instant)
    ));
    x.push_str(&format!("  <memory unit='KiB'>{}</memory>\n", m.vm.memory_bytes / 1024));
    x.push_str(&format!("  <vcpu>{}</vcpu>\n", m.vm.cpus));
    x.push_str(&format!(
        "  <os{firmware}>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    <boot dev='hd'/>\n  </os>\n"
    ));
    x.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
    x.push_str("  <devices>\n");
    for (i, (path, _)) in files.iter().enumerate() {
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      <source file='{}'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
            format.qemu_driver(),
            xml_escape(&path.display().to_string()),
            vdev(i)
        ));
    }
    x.push_str("    <interface type='network'>\n      <source network='default'/>\n      <model type='virtio'/>\n    </interface>\n");
    x.push_str("    <serial type='pty'/>\n    <console type='pty'/>\n");
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// An ARM template: one managed disk per migrated disk, created empty for upload with
/// the exact size of the uploaded file (`az disk grant-access` then upload the VHD),
/// and a VM that attaches disk 0 as its OS disk and the rest as data disks.
pub fn arm_template(m: &Manifest, files: &[(PathBuf, u64)], test: bool) -> String {
    let name = if test { format!("{}-test", m.vm.name) } else { m.vm.name.clone() };
    let generation = match m.vm.firmware {
        Firmware::Bios => "V1",
        Firmware::Uefi => "V2",
    };
    let disk_name = |i: usize| format!("{name}-disk{i}");
    let mut resources = Vec::new();
    for (i, (path, size)) in files.iter().enumerate() {
        let mut disk = json!({
            "type": "Microsoft.Compute/disks",
            "apiVersion": "2023-04-02",
            "name": disk_name(i),
            "location": "[parameters('location')]",
            "sku": { "name": "[parameters('diskSku')]" },
            "properties": {
                "creationData": { "createOption": "Upload", "uploadSizeBytes": size },
                "hyperVGeneration": generation
            },
            "tags": { "ternSourceFile": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default() }
        });
        if i == 0 {
            disk["properties"]["osType"] = json!("[parameters('osType')]");
        }
        resources.push(disk);
    }
    let data_disks: Vec<_> = (1..files.len())
        .map(|i| {
            json!({
                "lun": i - 1,
                "createOption": "Attach",
                "managedDisk": { "id": format!("[resourceId('Microsoft.Compute/disks', '{}')]", disk_name(i)) }
            })
        })
        .collect();
    let depends: Vec<_> = (0..files.len())
        .map(|i| format!("[resourceId('Microsoft.Compute/disks', '{}')]", disk_name(i)))
        .collect();
    let mut vm = json!({
        "type": "Microsoft.Compute/virtualMachines",
        "apiVersion": "2023-03-01",
        "name": name,
        "location": "[parameters('location')]",
        "dependsOn": depends,
        "properties": {
            "hardwareProfile": { "vmSize": "[parameters('vmSize')]" },
            "storageProfile": {
                "osDisk": {
                    "osType": "[parameters('osType')]",
                    "createOption": "Attach",
                    "managedDisk": { "id": format!("[resourceId('Microsoft.Compute/disks', '{}')]", disk_name(0)) }
                },
                "dataDisks": data_disks
            },
            "networkProfile": { "networkInterfaces": [ { "id": "[parameters('networkInterfaceId')]" } ] }
        }
    });
    if m.vm.firmware == Firmware::Uefi {
        vm["properties"]["securityProfile"] = json!({ "uefiSettings": { "secureBootEnabled": false } });
    }
    resources.push(vm);
    let t = json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "metadata": {
            "description": format!(
                "VM {} migrated by tern from point {} ({}): {} vCPUs, {} MiB memory, firmware {}. \
                 Deploy, upload each VHD into its disk, then start the VM.",
                m.vm.name, m.point_id, m.instant, m.vm.cpus, m.vm.memory_bytes >> 20, m.vm.firmware.name()
            ),
            "ternPoint": m.point_id,
            "cpus": m.vm.cpus,
            "memoryBytes": m.vm.memory_bytes
        },
        "parameters": {
            "location": { "type": "string", "defaultValue": "[resourceGroup().location]" },
            "vmSize": { "type": "string", "defaultValue": suggest_vm_size(m.vm.cpus, m.vm.memory_bytes),
                        "metadata": { "description": "Chosen to fit the source VM's vCPUs and memory" } },
            "osType": { "type": "string", "defaultValue": "Linux", "allowedValues": ["Linux", "Windows"] },
            "diskSku": { "type": "string", "defaultValue": "Premium_LRS" },
            "networkInterfaceId": { "type": "string",
                                    "metadata": { "description": "Resource id of the NIC to attach" } }
        },
        "resources": resources
    });
    serde_json::to_string_pretty(&t).unwrap_or_default() + "\n"
}

/// The smallest general-purpose (Dsv5: 4 GiB per vCPU) size that fits.
fn suggest_vm_size(cpus: u32, memory: u64) -> String {
    let need = cpus.max(memory.div_ceil(4 << 30) as u32).max(2);
    let size = [2u32, 4, 8, 16, 32, 48, 64, 96].into_iter().find(|&s| s >= need).unwrap_or(96);
    format!("Standard_D{size}s_v5")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_and_sizes() {
        assert_eq!(vdev(0), "vda");
        assert_eq!(vdev(25), "vdz");
        assert_eq!(vdev(26), "vdaa");
        assert_eq!(suggest_vm_size(1, 1 << 30), "Standard_D2s_v5");
        assert_eq!(suggest_vm_size(4, 32 << 30), "Standard_D8s_v5");
        assert_eq!(xml_escape("a&'<"), "a&amp;&apos;&lt;");
    }
}
