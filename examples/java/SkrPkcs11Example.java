// Java SunPKCS11 with skr-pkcs11: lists the token's keys with their certificates, signs with
// SHA256withRSA, RSASSA-PSS and SHA256withECDSA (verified with the JDK's software providers),
// decrypts RSA/ECB/PKCS1Padding, and serves TLS 1.2 and 1.3 from the PKCS11 KeyStore.
//
// Usage: java SkrPkcs11Example pkcs11.cfg [TLS_PORT CONNECTIONS]
import java.security.*;
import java.security.cert.X509Certificate;
import java.security.spec.MGF1ParameterSpec;
import java.security.spec.PSSParameterSpec;
import java.util.*;
import javax.crypto.Cipher;
import javax.net.ssl.*;

public class SkrPkcs11Example {
    static void check(boolean ok, String what) {
        if (!ok) throw new IllegalStateException("FAILED: " + what);
        System.out.println("ok: " + what);
    }

    public static void main(String[] args) throws Exception {
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, null); // C_Login with no PIN: protected authentication path
        List<String> aliases = Collections.list(ks.aliases());
        System.out.println("aliases: " + aliases);
        check(aliases.contains("tls-rsa") && aliases.contains("tls-ec"), "KeyStore lists tls-rsa and tls-ec");
        byte[] data = "signed by a key released to a TEE".getBytes("UTF-8");

        PrivateKey rsa = (PrivateKey) ks.getKey("tls-rsa", null);
        X509Certificate rsaCert = (X509Certificate) ks.getCertificate("tls-rsa");
        check(rsa != null && rsaCert != null, "tls-rsa has a private key and a certificate");
        Signature s = Signature.getInstance("SHA256withRSA", p);
        s.initSign(rsa); s.update(data);
        byte[] sig = s.sign();
        Signature v = Signature.getInstance("SHA256withRSA", "SunRsaSign");
        v.initVerify(rsaCert.getPublicKey()); v.update(data);
        check(v.verify(sig), "SHA256withRSA verifies with SunRsaSign");

        PSSParameterSpec pss = new PSSParameterSpec("SHA-256", "MGF1", MGF1ParameterSpec.SHA256, 32, 1);
        s = Signature.getInstance("RSASSA-PSS", p);
        s.setParameter(pss); s.initSign(rsa); s.update(data);
        sig = s.sign();
        v = Signature.getInstance("RSASSA-PSS", "SunRsaSign");
        v.setParameter(pss); v.initVerify(rsaCert.getPublicKey()); v.update(data);
        check(v.verify(sig), "RSASSA-PSS verifies with SunRsaSign");

        Cipher enc = Cipher.getInstance("RSA/ECB/PKCS1Padding", "SunJCE");
        enc.init(Cipher.ENCRYPT_MODE, rsaCert.getPublicKey());
        byte[] ct = enc.doFinal("premaster".getBytes("UTF-8"));
        Cipher dec = Cipher.getInstance("RSA/ECB/PKCS1Padding", p);
        dec.init(Cipher.DECRYPT_MODE, rsa);
        check(new String(dec.doFinal(ct), "UTF-8").equals("premaster"), "RSA/ECB/PKCS1Padding decrypts");

        PrivateKey ec = (PrivateKey) ks.getKey("tls-ec", null);
        X509Certificate ecCert = (X509Certificate) ks.getCertificate("tls-ec");
        s = Signature.getInstance("SHA256withECDSA", p);
        s.initSign(ec); s.update(data);
        sig = s.sign();
        v = Signature.getInstance("SHA256withECDSA", "SunEC");
        v.initVerify(ecCert.getPublicKey()); v.update(data);
        check(v.verify(sig), "SHA256withECDSA verifies with SunEC");

        if (args.length >= 3) {
            int port = Integer.parseInt(args[1]), conns = Integer.parseInt(args[2]);
            KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
            kmf.init(ks, null);
            SSLContext ctx = SSLContext.getInstance("TLS");
            ctx.init(kmf.getKeyManagers(), null, null);
            SSLServerSocket server = (SSLServerSocket) ctx.getServerSocketFactory()
                .createServerSocket(port, 16, java.net.InetAddress.getByName("127.0.0.1"));
            server.setEnabledProtocols(new String[] {"TLSv1.2", "TLSv1.3"});
            System.out.println("listening " + port);
            System.out.flush();
            for (int i = 0; i < conns; i++) {
                try (SSLSocket c = (SSLSocket) server.accept()) {
                    c.startHandshake();
                    String proto = c.getSession().getProtocol(), suite = c.getSession().getCipherSuite();
                    c.getOutputStream().write(("hello over " + proto + "\n").getBytes("UTF-8"));
                    c.getOutputStream().flush();
                    System.out.println("served " + proto + " " + suite);
                } catch (Exception e) {
                    System.out.println("handshake failed: " + e);
                }
            }
            server.close();
        }
    }
}
