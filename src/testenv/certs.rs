//! Certificates for the local control plane, made with rcgen (X.509 v3:
//! rustls refuses the v1 certificates a bare `openssl x509 -req` makes).

use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose, SanType,
};

pub struct Pki {
    pub dir: PathBuf,
    ca_pem: String,
    admin_cert_pem: String,
    admin_key_pem: String,
}

fn ca_params(cn: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(cn, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

/// Writes `ca.crt`, `apiserver.crt/.key`, `client-ca.crt`, `sa.key`, `sa.pub` into
/// `dir` and keeps the admin credential for the kubeconfig.
pub fn write_pki(dir: &Path) -> Result<Pki, super::Error> {
    std::fs::create_dir_all(dir)?;

    let serving_ca =
        CertifiedIssuer::self_signed(ca_params("sprite-operator-testenv-ca")?, KeyPair::generate()?)?;
    let mut serving = CertificateParams::new(vec!["localhost".to_string(), "kubernetes".to_string()])?;
    serving
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    serving
        .subject_alt_names
        .push(SanType::IpAddress([10, 0, 0, 1].into()));
    serving.distinguished_name = dn("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    let serving_cert = serving.signed_by(&serving_key, &serving_ca)?;

    let client_ca = CertifiedIssuer::self_signed(
        ca_params("sprite-operator-testenv-client-ca")?,
        KeyPair::generate()?,
    )?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = dn("default", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    let admin_cert = admin.signed_by(&admin_key, &client_ca)?;

    let sa_key = KeyPair::generate()?;

    let write = |name: &str, contents: &str| std::fs::write(dir.join(name), contents);
    write("ca.crt", &serving_ca.pem())?;
    write("apiserver.crt", &serving_cert.pem())?;
    write("apiserver.key", &serving_key.serialize_pem())?;
    write("client-ca.crt", &client_ca.pem())?;
    write("sa.key", &sa_key.serialize_pem())?;
    // The apiserver reads verification keys as PUBLIC KEY blocks only.
    write("sa.pub", &sa_key.public_key_pem())?;

    Ok(Pki {
        dir: dir.to_path_buf(),
        ca_pem: serving_ca.pem(),
        admin_cert_pem: admin_cert.pem(),
        admin_key_pem: admin_key.serialize_pem(),
    })
}

impl Pki {
    /// An admin kubeconfig for `server`, with every credential inline so the
    /// file works from any directory (kubectl, helm, the demo).
    pub fn kubeconfig(&self, server: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testenv
  context:
    cluster: testenv
    user: admin
    namespace: default
current-context: testenv
",
            ca = b64(&self.ca_pem),
            cert = b64(&self.admin_cert_pem),
            key = b64(&self.admin_key_pem),
        )
    }
}
