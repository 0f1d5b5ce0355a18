//! A domain's XML (libvirt's `dumpxml`), reduced to what cowshed needs: its
//! name, UUID and the files of each disk with the `<backingStore>` chain
//! libvirt records below the disk's own source.

use std::path::PathBuf;

use roxmltree::{Document, Node};

/// Where a disk's (or a backing store's) data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceXml {
    /// A file or a block device.
    Path(PathBuf),
    /// A storage pool's volume (`type='volume'`): resolved through the pool.
    Volume { pool: String, volume: String },
    /// A network disk, an empty drive or anything else not on a local path.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskXml {
    pub target: String,
    pub device: String,
    /// The disk's own source, then its backing stores, top down.
    pub chain: Vec<SourceXml>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    pub name: String,
    pub uuid: String,
    pub disks: Vec<DiskXml>,
}

/// libvirt limits nothing here; a hostile or broken document must not make
/// cowshed walk forever.
const MAX_BACKING_DEPTH: usize = 1000;

pub fn parse_domain(xml: &str) -> Result<DomainXml, String> {
    let doc = Document::parse(xml).map_err(|e| format!("unreadable domain XML: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(format!(
            "expected a <domain> document, found <{}>",
            root.tag_name().name()
        ));
    }
    let text_of = |tag: &str| {
        child(root, tag)
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
            .ok_or_else(|| format!("domain XML has no <{tag}>"))
    };
    let name = text_of("name")?;
    let uuid = text_of("uuid")?;
    let disks = child(root, "devices")
        .into_iter()
        .flat_map(|devices| devices.children().filter(|n| n.has_tag_name("disk")))
        .map(disk)
        .collect();
    Ok(DomainXml { name, uuid, disks })
}

fn disk(node: Node) -> DiskXml {
    let target = child(node, "target")
        .and_then(|t| t.attribute("dev"))
        .unwrap_or("")
        .to_string();
    let device = node.attribute("device").unwrap_or("disk").to_string();
    let mut chain = Vec::new();
    let mut level = Some(node);
    while let Some(n) = level {
        // An empty <backingStore/> ends the chain; a missing one means
        // libvirt did not look (a domain that is not running).
        let Some(source) = child(n, "source") else {
            break;
        };
        chain.push(source_of(n.attribute("type").unwrap_or("file"), source));
        if chain.len() >= MAX_BACKING_DEPTH {
            break;
        }
        level = child(n, "backingStore");
    }
    DiskXml {
        target,
        device,
        chain,
    }
}

fn source_of(kind: &str, source: Node) -> SourceXml {
    let attr = |a: &str| source.attribute(a).map(str::to_string);
    match kind {
        "file" => attr("file").map_or(SourceXml::Other, |p| SourceXml::Path(p.into())),
        "block" => attr("dev").map_or(SourceXml::Other, |p| SourceXml::Path(p.into())),
        "dir" => attr("dir").map_or(SourceXml::Other, |p| SourceXml::Path(p.into())),
        "volume" => match (attr("pool"), attr("volume")) {
            (Some(pool), Some(volume)) => SourceXml::Volume { pool, volume },
            _ => SourceXml::Other,
        },
        _ => SourceXml::Other,
    }
}

fn child<'a, 'i>(node: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_with_their_backing_store_chain() {
        let xml = r#"<domain type='qemu'><name>web-1</name>
          <uuid>eba2a67b-e235-4756-a7b7-879e92283673</uuid>
          <devices>
            <disk type='file' device='disk'>
              <source file='/v/ov.qcow2' index='1'/>
              <backingStore type='file' index='2'>
                <format type='qcow2'/><source file='/v/base.qcow2'/><backingStore/>
              </backingStore>
              <target dev='vda' bus='virtio'/>
            </disk>
            <disk type='volume' device='disk'>
              <source pool='default' volume='data.qcow2'/><target dev='vdb'/>
            </disk>
            <disk type='network' device='disk'>
              <source protocol='nbd' name='x'/><target dev='vdc'/>
            </disk>
            <disk type='file' device='cdrom'><target dev='sda'/></disk>
          </devices></domain>"#;
        let d = parse_domain(xml).expect("parses");
        assert_eq!(d.name, "web-1");
        assert_eq!(d.uuid, "eba2a67b-e235-4756-a7b7-879e92283673");
        assert_eq!(d.disks.len(), 4);
        assert_eq!(
            d.disks[0].chain,
            vec![
                SourceXml::Path("/v/ov.qcow2".into()),
                SourceXml::Path("/v/base.qcow2".into())
            ]
        );
        assert_eq!(d.disks[0].target, "vda");
        assert_eq!(
            d.disks[1].chain,
            vec![SourceXml::Volume {
                pool: "default".into(),
                volume: "data.qcow2".into()
            }]
        );
        assert_eq!(d.disks[2].chain, vec![SourceXml::Other]);
        assert!(d.disks[3].chain.is_empty());
        assert_eq!(d.disks[3].device, "cdrom");
    }

    #[test]
    fn broken_documents_are_errors_not_panics() {
        assert!(parse_domain("<domain><name>x</name>").is_err());
        assert!(parse_domain("<network/>").is_err());
        assert!(parse_domain("<domain><name>x</name></domain>").is_err());
    }
}
